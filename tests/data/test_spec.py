"""DataSpec: label values <-> class indices, encodings, regions, the three dataset.json spellings."""

from __future__ import annotations

import numpy as np
import pytest

from crossmodalnet.data.spec import (
    MMWHS,
    DataSpec,
    LabelClass,
    Region,
    default_region_order,
    normalization_scheme,
)
from crossmodalnet.errors import CrossModalNetError

MYOPS_VALUES = {"MYO": 200, "LV": 500, "RV": 600, "edema": 1220, "scar": 2221}
MYOPS_REGIONS = (Region("myocardium", (200, 1220, 2221)), Region("edema+scar", (1220, 2221)), Region("scar", (2221,)))


def myops(train_regions: bool = False) -> DataSpec:
    # Given out of value order on purpose: classes are sorted by value.
    classes = tuple(LabelClass(n, v) for n, v in reversed(MYOPS_VALUES.items()))
    order = default_region_order(MYOPS_REGIONS) if train_regions else ()
    return DataSpec(("C0", "LGE", "T2"), classes, MYOPS_REGIONS, train_regions, order)


def myops_map(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice([0, 200, 500, 600, 1220, 2221], size=(6, 7, 8)).astype(np.int16)


def test_classes_are_sorted_by_value_and_indexed_from_one():
    spec = myops()
    assert spec.values == (200, 500, 600, 1220, 2221)
    assert spec.names == ("MYO", "LV", "RV", "edema", "scar")
    assert spec.num_classes == 6 and spec.num_channels == 3
    assert spec.index("scar") == 5
    assert spec.num_outputs == 6
    assert myops(train_regions=True).num_outputs == 3


def test_to_indices_and_back_with_non_consecutive_values():
    spec = myops()
    values = myops_map()
    indices = spec.to_indices(values)
    assert indices.dtype == np.uint8 and indices.shape == values.shape
    assert set(np.unique(indices).tolist()) == {0, 1, 2, 3, 4, 5}
    assert np.array_equal(indices[values == 1220], np.full((values == 1220).sum(), 4))
    back = spec.to_values(indices)
    assert np.array_equal(back, values)
    assert back.dtype == np.int16  # 2221 does not fit uint8


def test_to_indices_accepts_whole_floats_and_refuses_fractions():
    spec = myops()
    assert np.array_equal(spec.to_indices(myops_map().astype(np.float32)), spec.to_indices(myops_map()))
    with pytest.raises(ValueError, match="non-integer"):
        spec.to_indices(np.array([0.0, 200.5]))


def test_to_values_refuses_out_of_range_indices():
    with pytest.raises(ValueError, match="0..5"):
        myops().to_values(np.array([0, 6]))


def test_encoding_detection():
    spec = myops()
    assert spec.encoding({0, 200, 2221}) == "values"
    assert spec.encoding({0, 1, 5}) == "indices"
    assert spec.encoding({0}) == "values"
    with pytest.raises(ValueError, match="mixes class indices \\[1\\] with label values \\[200\\]"):
        spec.encoding({0, 1, 200})
    with pytest.raises(ValueError, match="label values \\[7\\] are not labels"):
        spec.encoding({0, 7})
    # A file of indices is mapped as indices, not as values.
    assert np.array_equal(spec.to_indices(np.array([0, 1, 5])), [0, 1, 5])
    with pytest.raises(ValueError, match="mixes"):
        spec.to_indices(np.array([0, 1, 200]))


def test_region_masks():
    spec = myops()
    values = myops_map()
    masks = spec.region_masks(spec.to_indices(values))
    assert masks.shape == (3, *values.shape) and masks.dtype == bool
    assert np.array_equal(masks[0], np.isin(values, [200, 1220, 2221]))
    assert np.array_equal(masks[1], np.isin(values, [1220, 2221]))
    assert np.array_equal(masks[2], values == 2221)
    no_regions = DataSpec(("CT",), (LabelClass("A", 1),))
    assert no_regions.region_masks(np.zeros((2, 2, 2))).shape == (0, 2, 2, 2)


def test_nested_regions_paint_back_the_label_map():
    spec = myops(train_regions=True)
    assert spec.region_order == (200, 1220, 2221)
    values = myops_map()
    values[np.isin(values, [500, 600])] = 0  # only the classes the regions cover can come back
    indices = spec.to_indices(values)
    painted = spec.paint_regions(spec.region_masks(indices))
    assert np.array_equal(painted, indices)
    assert np.array_equal(spec.to_values(painted), values)


def test_paint_order_decides_overlaps():
    # Painted in the other order, the outer region paints over the inner ones.
    classes = tuple(LabelClass(n, v) for n, v in MYOPS_VALUES.items())
    wrong = DataSpec(("C0",), classes, MYOPS_REGIONS, True, (2221, 2221, 2221))
    values = np.array([0, 200, 1220, 2221])
    painted = wrong.paint_regions(wrong.region_masks(wrong.to_indices(values)))
    assert wrong.to_values(painted).tolist() == [0, 2221, 2221, 2221]


def test_default_region_order():
    assert default_region_order(MYOPS_REGIONS) == (200, 1220, 2221)
    # BraTS (nnU-Net): whole tumour {1,2,3}, tumour core {2,3}, enhancing {3}.
    brats = (Region("wt", (1, 2, 3)), Region("tc", (2, 3)), Region("et", (3,)))
    assert default_region_order(brats) == (1, 2, 3)
    # A region with no value of its own paints its largest.
    assert default_region_order((Region("a", (3,)), Region("b", (1, 3)))) == (3, 3)


def test_mmwhs_preset():
    assert MMWHS.channels == ("CT", "MR")
    assert MMWHS.values == (205, 420, 500, 550, 600, 820, 850)
    assert MMWHS.names == ("MYO", "LA", "LV", "RA", "RV", "AO", "PA")
    assert MMWHS.num_classes == 8
    assert MMWHS.enclosures == ((1, (3,)),)  # the myocardium wraps the LV blood pool
    assert MMWHS.colormap().shape == (8, 4)
    assert [normalization_scheme(c) for c in MMWHS.channels] == ["ct", "zscore"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"channels": ()}, "1 to 4 channels"),
    ({"channels": ("CT", "ct")}, "channel names must differ"),
    ({"classes": (LabelClass("A", 1), LabelClass("B", 1))}, "labels 'A' and 'B' share the value 1"),
    ({"classes": (LabelClass("A", 0),)}, "positive integer"),
    ({"classes": (LabelClass("background", 1),)}, "not be 'background'"),
    ({"regions": (Region("r", (9,)),)}, "region 'r' names label value\\(s\\) \\[9\\]"),
    ({"regions": (Region("r", (1,)),), "train_regions": True, "region_order": (2,)}, "not one of its values"),
    ({"train_regions": True}, "needs regions"),
])
def test_bad_descriptions_are_refused_in_one_line(kwargs, match):
    args = {"channels": ("CT",), "classes": (LabelClass("A", 1), LabelClass("B", 2)), **kwargs}
    with pytest.raises(CrossModalNetError, match=match) as info:
        DataSpec(**args)
    assert "\n" not in str(info.value)


def test_from_dict_nnunet_v2():
    spec = DataSpec.from_dict({"channel_names": {"1": "ADC", "0": "T2"}, "labels": {"background": 0, "PZ": 1, "TZ": 2}})
    assert spec.channels == ("T2", "ADC")
    assert spec.names == ("PZ", "TZ") and spec.values == (1, 2)
    assert not spec.train_regions


def test_from_dict_nnunet_v2_regions():
    meta = {"channel_names": {"0": "FLAIR", "1": "T1"},
            "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3},
            "regions_class_order": [1, 2, 3]}
    spec = DataSpec.from_dict(meta)
    assert spec.train_regions and spec.region_order == (1, 2, 3)
    assert [(r.name, r.values) for r in spec.regions] == [
        ("whole tumor", (1, 2, 3)), ("tumor core", (2, 3)), ("enhancing tumor", (3,))]
    assert spec.values == (1, 2, 3)
    assert spec.names == ("label_1", "label_2", "enhancing tumor")
    assert spec.num_outputs == 3


def test_from_dict_msd():
    meta = {"modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}}
    spec = DataSpec.from_dict(meta)
    assert spec.channels == ("FLAIR", "T1w", "t1gd", "T2w")
    assert spec.names == ("edema", "non-enhancing tumor", "enhancing tumour")
    assert spec.values == (1, 2, 3)
    # label_codes: the values in the files of an index -> name table (our older spelling).
    codes = DataSpec.from_dict({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "MYO", "2": "LA"},
                                "label_codes": {"1": 205, "2": 420}})
    assert codes.values == (205, 420) and codes.names == ("MYO", "LA")


def test_from_dict_ours_with_regions_by_name_and_extras():
    meta = {"channel_names": {"0": "C0", "1": "LGE", "2": "T2"},
            "labels": {"background": 0, **MYOPS_VALUES},
            "regions": {"myocardium": ["MYO", "edema", "scar"], "edema+scar": [1220, 2221], "scar": [2221]},
            "colors": {"scar": [255, 0, 0]}, "encloses": {"MYO": ["LV"]}, "descriptions": {"LV": "blood pool"}}
    spec = DataSpec.from_dict(meta)
    assert spec.regions == MYOPS_REGIONS
    assert not spec.train_regions
    assert spec.colors()[spec.index("scar") - 1] == (255, 0, 0)
    assert spec.enclosures == ((1, (2,)),)
    assert spec.classes[1].description == "blood pool"
    trained = DataSpec.from_dict({**meta, "train_regions": True})
    assert trained.region_order == (200, 1220, 2221)


@pytest.mark.parametrize("spec", [myops(), myops(train_regions=True), MMWHS,
                                  DataSpec(("CT",), (LabelClass("A", 7, (1, 2, 3), (), "a"),))],
                         ids=["myops", "myops-regions", "mmwhs", "one"])
def test_to_dict_from_dict_round_trip(spec):
    assert DataSpec.from_dict(spec.to_dict()) == spec
    assert DataSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(("meta", "match"), [
    ({"labels": {"background": 0, "A": 1}}, "names no channels"),
    ({"channel_names": {"0": "T2", "2": "ADC"}, "labels": {"A": 1}}, "without gaps, got \\[0, 2\\]"),
    ({"channel_names": {"0": "T2"}, "labels": {}}, "'labels' must be a non-empty mapping"),
    ({"channel_names": {"0": "T2"}, "labels": {"A": 1, "B": 1}}, "labels 'A' and 'B' share the value 1"),
    ({"channel_names": {"0": "T2"}, "labels": {"A": 1}, "regions": {"r": ["B"]}}, "region 'r' names unknown label 'B'"),
    ({"channel_names": {"0": "T2"}, "labels": {"A": "one"}}, "labels.A: value must be an integer"),
    ({"channel_names": {"0": "T2"}, "labels": {"A": 1}, "colors": {"B": [1, 2, 3]}}, "'colors' names unknown"),
])
def test_from_dict_refuses_in_one_line_naming_the_source(meta, match):
    with pytest.raises(CrossModalNetError, match=match) as info:
        DataSpec.from_dict(meta, "/data/x/dataset.json")
    assert str(info.value).startswith("/data/x/dataset.json: ")
    assert "\n" not in str(info.value)

"""What a dataset is made of: its channels, its labels and its regions (`DataSpec`).

Every command takes these from the dataset (`dataset.json`) or from the run that was trained on
it (`spec.json` in the run folder); nothing else in the package knows a label or a channel name.

    spec = DataSpec(channels=("C0", "LGE", "T2"),
                    classes=(LabelClass("MYO", 200), LabelClass("LV", 500), ...),
                    regions=(Region("scar", (2221,)), Region("edema+scar", (1220, 2221))))
    indices = spec.to_indices(label_map)      # values on disk -> class indices 0..K-1
    values = spec.to_values(indices)          # and back, for predictions
    masks = spec.region_masks(indices)        # (R, *spatial) bool, one per region

Classes: the label values of the files (any integers, not necessarily consecutive: MyoPS uses
200, 500, 600, 1220, 2221), mapped to class indices 1..K-1 in ascending value order; 0 is
background. A label map may hold the values or the indices (a file written by a model trained on
indices); `to_indices` detects which, and refuses a file that mixes them.

Regions (nnU-Net v2's idea): named unions of label values, evaluated as their own rows (BraTS
whole tumour = {1, 2, 3}; MyoPS edema+scar = {1220, 2221}). With `train_regions` the network
predicts one sigmoid per region, as nnU-Net does, and a label map is painted back from them in
`region_order` (each region's voxels take that value, later regions over earlier ones).

`encloses` is the topology prior of JADA and the audit (a class whose tunnels and cavities are
another's: the LV myocardium wraps the LV blood pool); empty where the dataset says nothing.

One idea in one file, though a long one: the description of a dataset, with every spelling of it
that is read and every check of it, so that there is one place that knows what a label is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crossmodalnet.errors import CrossModalNetError

__all__ = ["LabelClass", "Region", "DataSpec", "MMWHS", "PALETTE", "MAX_CHANNELS", "CT_NAMES", "normalization_scheme",
           "default_region_order"]

MAX_CHANNELS = 4
# Channel names whose intensities are physical units (Hounsfield): dataset-wide normalisation.
CT_NAMES = frozenset({"CT"})
# Okabe-Ito, then a few more: colour-blind-safe defaults for classes the dataset gives no colour.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (213, 94, 0), (0, 158, 115), (0, 114, 178), (204, 121, 167),
    (240, 228, 66), (153, 153, 153), (117, 112, 179), (102, 166, 30), (231, 41, 138), (166, 118, 29),
)


def normalization_scheme(channel: str) -> str:
    """"ct" (dataset-wide foreground clip + z-score) for CT, "zscore" (per image) for anything else,
    as nnU-Net chooses by channel name; "none" for a channel named `noNorm` (nnU-Net's word)."""
    name = channel.strip()
    if name.upper() in CT_NAMES:
        return "ct"
    if name.lower() in {"nonorm", "none"}:
        return "none"
    return "zscore"


@dataclass(frozen=True)
class LabelClass:
    """One foreground class: its name, its value in the label files, an RGB colour (0-255) and the
    names of the classes it encloses (topology prior)."""

    name: str
    value: int
    color: tuple[int, int, int] | None = None
    encloses: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Region:
    """A named union of label values (an evaluation row; a training target with `train_regions`)."""

    name: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class DataSpec:
    """Channels, classes and regions of a dataset (see module docstring)."""

    channels: tuple[str, ...]
    classes: tuple[LabelClass, ...]
    regions: tuple[Region, ...] = ()
    train_regions: bool = False
    # With train_regions: the label value painted for each region, in painting order.
    region_order: tuple[int, ...] = ()
    # Whether the channels are registered voxel to voxel (sequences of one session: MyoPS, BraTS) or may
    # be off by a few voxels (CT and MR of separate scans: the phantom, MM-WHS); None: not said. Models
    # may fuse differently (`ModelConfig.for_data`).
    registered: bool | None = None
    _lookup: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem:
            raise CrossModalNetError(f"dataset description: {problem}")
        classes = tuple(sorted(self.classes, key=lambda c: c.value))
        object.__setattr__(self, "classes", classes)
        self._lookup.update({c.value: i + 1 for i, c in enumerate(classes)})

    def problem(self) -> str | None:
        """What is wrong with this description, or None."""
        if not 1 <= len(self.channels) <= MAX_CHANNELS:
            return f"needs 1 to {MAX_CHANNELS} channels, got {len(self.channels)}"
        names = [c.strip() for c in self.channels]
        if any(not n for n in names):
            return "a channel has an empty name"
        if len({n.casefold() for n in names}) != len(names):
            return f"channel names must differ, got {list(self.channels)}"
        if not self.classes:
            return "needs at least one foreground label besides background (value 0)"
        values = [c.value for c in self.classes]
        for c in self.classes:
            if isinstance(c.value, bool) or not isinstance(c.value, int) or c.value <= 0:
                return f"label {c.name!r}: value must be a positive integer (0 is background), got {c.value!r}"
            if c.value > 2**31 - 1:
                return f"label {c.name!r}: value {c.value} does not fit a 32-bit integer"
        if len(set(values)) != len(values):
            seen: dict[int, str] = {}
            for c in self.classes:
                if c.value in seen:
                    return f"labels {seen[c.value]!r} and {c.name!r} share the value {c.value}"
                seen[c.value] = c.name
        class_names = [c.name for c in self.classes]
        if len(set(class_names)) != len(class_names) or "background" in class_names:
            return f"label names must differ and not be 'background', got {class_names}"
        known = set(class_names)
        for c in self.classes:
            unknown = [n for n in c.encloses if n not in known or n == c.name]
            if unknown:
                return f"label {c.name!r} encloses unknown label(s) {unknown}"
        region_names = [r.name for r in self.regions]
        if len(set(region_names)) != len(region_names):
            return f"region names must differ, got {region_names}"
        for r in self.regions:
            if not r.values:
                return f"region {r.name!r} names no label"
            unknown = sorted(set(r.values) - set(values))
            if unknown:
                return f"region {r.name!r} names label value(s) {unknown} that are not labels {sorted(values)}"
        if self.train_regions:
            if not self.regions:
                return "training on regions needs regions"
            if len(self.region_order) != len(self.regions):
                return (f"region_order needs one label value per region ({len(self.regions)}), "
                        f"got {list(self.region_order)}")
            for r, v in zip(self.regions, self.region_order, strict=True):
                if v not in r.values:
                    return (f"region_order paints region {r.name!r} with {v}, which is not one of its values "
                            f"{list(r.values)}")
        return None

    # --- sizes and names ---------------------------------------------------------------------
    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def num_classes(self) -> int:
        """Classes with background."""
        return len(self.classes) + 1

    @property
    def num_outputs(self) -> int:
        """Channels of the network's output: one per class (softmax) or per region (sigmoid)."""
        return len(self.regions) if self.train_regions else self.num_classes

    @property
    def activation(self) -> str:
        """How the network's logits become probabilities: "sigmoid" per region or "softmax"."""
        return "sigmoid" if self.train_regions else "softmax"

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities (num_outputs, *S) -> class indices (*S) uint8: the argmax, or with
        `train_regions` every region over 0.5 painted in `region_order`."""
        probs = np.asarray(probs)
        if len(probs) != self.num_outputs:
            raise ValueError(f"expected {self.num_outputs} probability maps, got {len(probs)}")
        if self.train_regions:
            return self.paint_regions(probs > 0.5)
        return probs.argmax(0).astype(np.uint8)

    @property
    def names(self) -> tuple[str, ...]:
        """Foreground class names, in class-index order (index i + 1)."""
        return tuple(c.name for c in self.classes)

    @property
    def values(self) -> tuple[int, ...]:
        return tuple(c.value for c in self.classes)

    def index(self, name: str) -> int:
        """Class index (1..K-1) of a class name."""
        for i, c in enumerate(self.classes):
            if c.name == name:
                return i + 1
        raise KeyError(name)

    @property
    def enclosures(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """(index, indices it encloses) for every class that encloses others (topology prior)."""
        return tuple((i + 1, tuple(self.index(n) for n in c.encloses))
                     for i, c in enumerate(self.classes) if c.encloses)

    def region_indices(self, region: Region) -> tuple[int, ...]:
        return tuple(self._lookup[v] for v in region.values)

    # --- label maps --------------------------------------------------------------------------
    def encoding(self, present: set[int]) -> str:
        """"indices" or "values" for the set of values present in a label map; ValueError naming
        the offending values when they fit neither."""
        indices, values = set(range(self.num_classes)), {0, *self.values}
        if present <= values:
            return "values"
        if present <= indices:
            return "indices"
        invalid = sorted(present - indices - values)
        if invalid:
            more = f" and {len(invalid) - 8} more" if len(invalid) > 8 else ""
            raise ValueError(f"label values {invalid[:8]}{more} are not labels of the dataset "
                             f"(values {[0, *self.values]}, or class indices 0-{self.num_classes - 1})")
        raise ValueError(f"label map mixes class indices {sorted(present - values)} with label values "
                         f"{sorted(present - indices)}; a file must hold one encoding only")

    def to_indices(self, labels: np.ndarray) -> np.ndarray:
        """Label map of values (or indices) -> uint8 class indices 0..K-1, same shape."""
        arr = np.asarray(labels)
        if not np.issubdtype(arr.dtype, np.integer):
            rounded = np.rint(arr)
            if not np.allclose(arr, rounded):
                raise ValueError("label map holds non-integer values")
            arr = rounded.astype(np.int64)
        present = {int(v) for v in np.unique(arr)}
        if self.encoding(present) == "indices":
            return arr.astype(np.uint8)
        out = np.zeros(arr.shape, dtype=np.uint8)
        for value, index in self._lookup.items():
            if value in present:
                out[arr == value] = index
        return out

    def to_values(self, indices: np.ndarray) -> np.ndarray:
        """Class indices 0..K-1 -> the dataset's label values (smallest integer type that holds them)."""
        arr = np.asarray(indices).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_classes):
            raise ValueError(f"class indices must lie in 0..{self.num_classes - 1}")
        table = np.array([0, *self.values], dtype=np.int64)
        top = max(self.values)
        dtype = np.uint8 if top < 256 else np.int16 if top < 2**15 else np.int32
        return table[arr].astype(dtype)

    def region_masks(self, indices: np.ndarray | Any) -> np.ndarray:
        """Class indices (*S) -> (R, *S) bool, one mask per region (numpy)."""
        arr = np.asarray(indices)
        return np.stack([np.isin(arr, self.region_indices(r)) for r in self.regions]) if self.regions \
            else np.zeros((0, *arr.shape), dtype=bool)

    def paint_regions(self, masks: np.ndarray) -> np.ndarray:
        """(R, *S) bool region masks -> class indices (*S), painted in `region_order`."""
        out = np.zeros(masks.shape[1:], dtype=np.uint8)
        for mask, value in zip(masks, self.region_order, strict=True):
            out[np.asarray(mask, dtype=bool)] = self._lookup[value]
        return out

    def colors(self) -> list[tuple[int, int, int]]:
        """RGB 0-255 per foreground class, the dataset's or the palette's."""
        return [c.color if c.color is not None else PALETTE[i % len(PALETTE)] for i, c in enumerate(self.classes)]

    def colormap(self) -> np.ndarray:
        """(num_classes, 4) RGBA floats in [0, 1]; background transparent. For matplotlib overlays."""
        cmap = np.zeros((self.num_classes, 4))
        for i, rgb in enumerate(self.colors()):
            cmap[i + 1, :3] = np.array(rgb) / 255.0
            cmap[i + 1, 3] = 1.0
        return cmap

    # --- persistence -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The nnU-Net v2 spelling (`channel_names`, `labels` name -> value) plus our keys."""
        out: dict[str, Any] = {
            "channel_names": {str(i): name for i, name in enumerate(self.channels)},
            "labels": {"background": 0, **{c.name: c.value for c in self.classes}},
        }
        if self.regions:
            out["regions"] = {r.name: list(r.values) for r in self.regions}
        if self.train_regions:
            out["train_regions"] = True
            out["regions_class_order"] = list(self.region_order)
        colors = {c.name: list(c.color) for c in self.classes if c.color is not None}
        if colors:
            out["colors"] = colors
        encloses = {c.name: list(c.encloses) for c in self.classes if c.encloses}
        if encloses:
            out["encloses"] = encloses
        descriptions = {c.name: c.description for c in self.classes if c.description}
        if descriptions:
            out["descriptions"] = descriptions
        if self.registered is not None:
            out["registered"] = self.registered
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, meta: dict, source: str = "dataset.json") -> DataSpec:
        """Read the channels, labels and regions of a dataset description, in any of the spellings
        researchers hold (errors: one line naming `source` and the key):

        - nnU-Net v2: `channel_names` {"0": "T2", "1": "ADC"}, `labels` {"background": 0, "PZ": 1}; a
          label given as a list of values is a region and makes training region-based, painted
          back in `regions_class_order`;
        - MSD / ours before: `modality` {"0": "FLAIR"}, `labels` {"0": "background", "1": "edema"},
          optional `label_codes` {"1": 205} (the values in the files);
        - our additions: `regions` {"scar": [2221]} (evaluation rows; a region may name labels by
          value or by name), `train_regions`, `colors`, `encloses`, `descriptions`, `registered`.
        """
        def fail(detail: str) -> CrossModalNetError:
            return CrossModalNetError(f"{source}: {detail}")

        if not isinstance(meta, dict):
            raise fail(f"expected a JSON object, got {type(meta).__name__}")
        channels = _channels(meta, fail)
        raw_labels = meta.get("labels")
        if not isinstance(raw_labels, dict) or not raw_labels:
            raise fail(f"'labels' must be a non-empty mapping, got {raw_labels!r:.80}")
        classes: list[tuple[str, int]] = []
        region_defs: list[tuple[str, Any]] = []
        codes = meta.get("label_codes") or {}
        if not isinstance(codes, dict):
            raise fail(f"'label_codes' must be a mapping of index to value, got {codes!r:.80}")
        msd = all(_is_int_text(k) for k in raw_labels)
        # nnU-Net v2: once one label is a list of values, every label is a region ("enhancing tumor": 3
        # is the region of one value beside "whole tumor": [1, 2, 3]), and the classes are the values.
        nnunet_regions = not msd and any(isinstance(v, list) for v in raw_labels.values())
        for key, val in raw_labels.items():
            if msd:  # "1": "edema": the key is the value (or the index of label_codes)
                if not isinstance(val, str) or not val:
                    raise fail(f"labels.{key}: a label name must be a non-empty string, got {val!r:.60}")
                value = int(key)
                if str(key) in codes:
                    value = codes[str(key)]
                    if isinstance(value, bool) or not isinstance(value, int):
                        raise fail(f"label_codes.{key}: must be an integer, got {value!r:.60}")
                if int(key) == 0:
                    continue
                classes.append((val, value))
            elif isinstance(val, list):  # nnU-Net v2 region
                region_defs.append((key, val))
            elif isinstance(val, bool) or not isinstance(val, int):
                raise fail(f"labels.{key}: value must be an integer (or a list of them for a region), "
                           f"got {val!r:.60}")
            elif val == 0:
                continue
            elif nnunet_regions:
                region_defs.append((key, [val]))
            else:
                classes.append((key, val))
        train_regions = bool(region_defs) or bool(meta.get("train_regions", False))
        extra = meta.get("regions") or {}
        if not isinstance(extra, dict):
            raise fail(f"'regions' must be a mapping of name to label values, got {extra!r:.80}")
        region_defs += list(extra.items())
        if region_defs and not classes:
            # nnU-Net v2 region datasets list only regions: the classes are the values they use, named
            # after the region of that one value where there is one ("enhancing tumor": 3).
            values = sorted({v for _, vals in region_defs if isinstance(vals, list) for v in vals
                             if isinstance(v, int) and not isinstance(v, bool) and v > 0})
            single = {vals[0]: str(n) for n, vals in region_defs if isinstance(vals, list) and len(vals) == 1}
            classes = [(single.get(v, f"label_{v}"), v) for v in values]
        by_name = {n: v for n, v in classes}
        regions = []
        for name, vals in region_defs:
            vals = vals if isinstance(vals, list) else [vals]
            resolved = []
            for v in vals:
                if isinstance(v, str) and v in by_name:
                    resolved.append(by_name[v])
                elif isinstance(v, int) and not isinstance(v, bool):
                    resolved.append(v)
                else:
                    raise fail(f"region {name!r} names unknown label {v!r:.40} (labels: {', '.join(by_name)})")
            regions.append(Region(str(name), tuple(sorted(set(resolved) - {0}))))
        order = meta.get("regions_class_order", ())
        if train_regions and not order:
            order = list(default_region_order(regions))
        if not isinstance(order, list | tuple) or not all(isinstance(v, int) for v in order):
            raise fail(f"'regions_class_order' must be a list of label values, got {order!r:.80}")
        colors, encloses, descr = (meta.get(k) or {} for k in ("colors", "encloses", "descriptions"))
        for key, mapping in (("colors", colors), ("encloses", encloses), ("descriptions", descr)):
            if not isinstance(mapping, dict):
                raise fail(f"'{key}' must be a mapping by label name, got {mapping!r:.80}")
            unknown = [k for k in mapping if k not in by_name]
            if unknown:
                raise fail(f"'{key}' names unknown label(s) {unknown} (labels: {', '.join(by_name)})")
        built = []
        for name, value in classes:
            color = colors.get(name)
            if color is not None and (not isinstance(color, list) or len(color) != 3
                                      or not all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
                raise fail(f"colors.{name}: must be [r, g, b] integers 0-255, got {color!r:.60}")
            enc = encloses.get(name, [])
            if not isinstance(enc, list) or not all(isinstance(n, str) for n in enc):
                raise fail(f"encloses.{name}: must be a list of label names, got {enc!r:.60}")
            built.append(LabelClass(name, value, None if color is None else tuple(color), tuple(enc),
                                    str(descr.get(name, ""))))
        registered = meta.get("registered")
        if registered is not None and not isinstance(registered, bool):
            raise fail(f"'registered' must be true or false, got {registered!r:.40}")
        try:
            return cls(channels=channels, classes=tuple(built), regions=tuple(regions),
                       train_regions=train_regions, region_order=tuple(order) if train_regions else (),
                       registered=registered)
        except CrossModalNetError as exc:
            raise fail(str(exc).removeprefix("dataset description: ")) from None

    @classmethod
    def from_json(cls, text: str, source: str = "spec.json") -> DataSpec:
        try:
            meta = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise CrossModalNetError(f"{source}: invalid JSON ({' '.join(str(exc).split())})") from None
        return cls.from_dict(meta, source)


def default_region_order(regions: tuple[Region, ...] | list[Region]) -> tuple[int, ...]:
    """The value each region paints when a dataset gives no `regions_class_order`: the largest of
    its values that no later region holds (later regions paint over it), else its largest value.

    Nested regions (MyoPS: myocardium {200, 1220, 2221} > edema+scar {1220, 2221} > scar {2221})
    paint 200, 1220, 2221 and give back the label map they were taken from.
    """
    order = []
    for i, r in enumerate(regions):
        later = {v for other in regions[i + 1:] for v in other.values}
        own = [v for v in r.values if v not in later]
        order.append(max(own) if own else max(r.values, default=0))
    return tuple(order)


def _is_int_text(key: object) -> bool:
    return isinstance(key, str) and key.strip().lstrip("-").isdigit()


def _channels(meta: dict, fail) -> tuple[str, ...]:
    """Channel names in index order from `channel_names` (nnU-Net v2) or `modality` (MSD)."""
    key = "channel_names" if "channel_names" in meta else "modality" if "modality" in meta else None
    if key is None:
        raise fail("names no channels: add 'channel_names' {\"0\": \"CT\", ...} (or MSD's 'modality')")
    raw = meta[key]
    if not isinstance(raw, dict) or not raw:
        raise fail(f"'{key}' must be a non-empty mapping of channel index to name, got {raw!r:.80}")
    if not all(_is_int_text(k) for k in raw):
        raise fail(f"'{key}' keys must be channel indices \"0\", \"1\", ..., got {list(raw)!r:.80}")
    indices = sorted(int(k) for k in raw)
    if indices != list(range(len(raw))):
        raise fail(f"'{key}': channel indices must be 0..{len(raw) - 1} without gaps, got {indices}")
    if len(raw) > MAX_CHANNELS:
        raise fail(f"'{key}': {len(raw)} channels; crossmodalnet takes 1 to {MAX_CHANNELS}")
    names = {int(k): v for k, v in raw.items()}
    for i, v in names.items():
        if not isinstance(v, str) or not v.strip():
            raise fail(f"'{key}'.{i}: a channel name must be a non-empty string, got {v!r:.60}")
    return tuple(names[i].strip() for i in range(len(names)))


_MMWHS_CLASSES = (
    LabelClass("MYO", 205, (230, 159, 0), ("LV",), "myocardium of the left ventricle"),
    LabelClass("LA", 420, (86, 180, 233), (), "left atrium blood cavity"),
    LabelClass("LV", 500, (213, 94, 0), (), "left ventricle blood cavity"),
    LabelClass("RA", 550, (0, 158, 115), (), "right atrium blood cavity"),
    LabelClass("RV", 600, (0, 114, 178), (), "right ventricle blood cavity"),
    LabelClass("AO", 820, (204, 121, 167), (), "ascending aorta"),
    LabelClass("PA", 850, (240, 228, 66), (), "pulmonary artery"),
)
# The MM-WHS preset: what the phantom and `prepare-mmwhs` write (CT + MR, seven structures).
MMWHS = DataSpec(channels=("CT", "MR"), classes=_MMWHS_CLASSES)

"""The MM-WHS preset as a table (`data.labels`, a view of `spec.MMWHS`): codes <-> indices, encoding detection,
colours."""

import numpy as np
import pytest

from crossmodalnet.data.labels import (
    CODES,
    NAMES,
    NUM_CLASSES,
    STRUCTURES,
    colormap,
    detect_encoding,
    to_codes,
    to_indices,
)
from crossmodalnet.data.spec import MMWHS


def test_table_matches_the_design():
    # docs/design.md, section 1 (the label table): ascending MM-WHS codes -> indices 1..7, background 0.
    assert NUM_CLASSES == 8
    assert CODES == (205, 420, 500, 550, 600, 820, 850)
    assert NAMES == ("MYO", "LA", "LV", "RA", "RV", "AO", "PA")
    assert [s.index for s in STRUCTURES] == list(range(1, 8))
    assert len({s.color for s in STRUCTURES}) == 7  # distinguishable in plots
    # The table is a view of the preset: one source of the classes, values, colours and the prior.
    assert NUM_CLASSES == MMWHS.num_classes and CODES == MMWHS.values and NAMES == MMWHS.names
    assert [s.color for s in STRUCTURES] == MMWHS.colors()
    assert {s.index: s.encloses for s in STRUCTURES if s.encloses} == {1: (3,)} == dict(MMWHS.enclosures)


def test_round_trips():
    rng = np.random.default_rng(0)
    indices = rng.integers(0, 8, size=(5, 6, 7)).astype(np.uint8)
    codes = to_codes(indices)
    assert codes.dtype == np.int16 and codes.shape == indices.shape
    np.testing.assert_array_equal(np.unique(codes), [0, *CODES])
    back = to_indices(codes)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, indices)
    np.testing.assert_array_equal(to_codes(to_indices(codes)), codes)
    np.testing.assert_array_equal(to_indices(indices), indices)  # indices pass through
    np.testing.assert_array_equal(to_indices(np.array([0, 205, 500, 850])), [0, 1, 3, 7])
    np.testing.assert_array_equal(to_codes(np.array([0, 1, 3, 7])), [0, 205, 500, 850])


def test_detect_encoding():
    assert detect_encoding(np.array([0, 1, 7])) == "indices"
    assert detect_encoding(np.array([0, 0])) == "indices"  # background only reads as either; indices
    assert detect_encoding(np.array([0, 205, 850])) == "codes"
    assert detect_encoding(np.array([420])) == "codes"
    with pytest.raises(ValueError, match=r"\[8\]"):
        detect_encoding(np.array([0, 8]))
    with pytest.raises(ValueError, match=r"\[206\]"):
        detect_encoding(np.array([0, 205, 206]))
    # Mixed encodings: 3 and 500 are each valid, in different tables; the message names both sides
    # and does not call 500 invalid.
    with pytest.raises(ValueError, match=r"mixes class indices \[3\] with label values \[500\]"):
        detect_encoding(np.array([0, 3, 500]))
    with pytest.raises(ValueError, match=r"label values \[9999\] are not labels"):  # invalid in both beats mixed
        detect_encoding(np.array([0, 3, 500, 9999]))


def test_bad_values():
    with pytest.raises(ValueError, match="non-integer"):
        to_indices(np.array([0.0, 1.5]))
    np.testing.assert_array_equal(to_indices(np.array([0.0, 2.0])), [0, 2])
    with pytest.raises(ValueError, match="0..7"):
        to_codes(np.array([0, 8]))
    with pytest.raises(ValueError, match="0..7"):
        to_codes(np.array([-1]))


def test_colormap():
    cmap = colormap()
    assert cmap.shape == (8, 4)
    assert cmap[0, 3] == 0.0  # background transparent
    np.testing.assert_allclose(cmap[1:, 3], 1.0)
    np.testing.assert_allclose(cmap[1, :3], np.array(STRUCTURES[0].color) / 255)

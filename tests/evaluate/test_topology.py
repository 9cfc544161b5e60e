"""Betti numbers on shapes whose topology is known: balls, shells, tori, rings, notched shells."""

import numpy as np
import pytest

from crossmodalnet.evaluate.topology import betti_errors, betti_numbers, euler_characteristic

N = 40
_G = np.indices((N, N, N)) - (N - 1) / 2  # voxel centres relative to the volume centre


def _ball(radius: float, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    c = np.asarray(centre, dtype=float)[:, None, None, None]
    return np.sqrt(((_G - c) ** 2).sum(0)) < radius


def _torus(major: float, minor: float) -> np.ndarray:
    ring = np.sqrt(_G[0] ** 2 + _G[1] ** 2)
    return np.sqrt((ring - major) ** 2 + _G[2] ** 2) < minor


@pytest.mark.parametrize(
    "name, mask, expected, chi",
    [
        ("solid ball", _ball(10), (1, 0, 0), 1),
        ("hollow sphere shell", _ball(12) & ~_ball(8), (1, 0, 1), 2),
        ("solid torus", _torus(11, 4), (1, 1, 0), 0),
        ("two balls", _ball(6, (-10, 0, 0)) | _ball(6, (10, 0, 0)), (2, 0, 0), 2),
        ("ball with two cavities", _ball(15) & ~_ball(3, (-7, 0, 0)) & ~_ball(3, (7, 0, 0)), (1, 0, 2), 3),
        ("empty", np.zeros((N, N, N), bool), (0, 0, 0), 0),
    ],
)
def test_known_shapes(name, mask, expected, chi):
    assert betti_numbers(mask) == expected, name
    assert euler_characteristic(mask) == chi, name


def _block(shape) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def test_single_voxel_is_a_closed_cube():
    m = _block((3, 3, 3))
    m[1, 1, 1] = True
    # V − E + F − C = 8 − 12 + 6 − 1
    assert euler_characteristic(m) == 1
    assert betti_numbers(m) == (1, 0, 0)


@pytest.mark.parametrize("offset", [(1, 1, 1), (1, 1, 0), (1, 0, 0)])
def test_voxels_touching_at_a_corner_edge_or_face_are_one_component(offset):
    # 26-connectivity of the foreground: closed cubes sharing a vertex are one piece.
    m = _block((4, 4, 4))
    m[1, 1, 1] = True
    m[1 + offset[0], 1 + offset[1], 1 + offset[2]] = True
    assert betti_numbers(m) == (1, 0, 0)


def test_planar_rings_count_tunnels():
    ring = _block((5, 5, 3))
    ring[1:4, 1:4, 1] = True
    ring[2, 2, 1] = False
    assert betti_numbers(ring) == (1, 1, 0)
    plate = _block((5, 7, 3))
    plate[1:4, 1:6, 1] = True
    plate[2, 2, 1] = plate[2, 4, 1] = False  # two holes: a two-handled plate
    assert betti_numbers(plate) == (1, 2, 0)
    # A hole that is only diagonal (corner-touching) does not open the ring: the closed cubes meet.
    diag = _block((4, 4, 3))
    diag[1, 1, 1] = diag[2, 2, 1] = True
    assert betti_numbers(diag) == (1, 0, 0)


def test_cavity_enclosed_through_corner_notches():
    # 3x3x3 block without its centre and its 8 corners: the centre's 6 face neighbours are all
    # there, so with 6-connectivity of the background the centre is still an enclosed cavity.
    m = _block((5, 5, 5))
    m[1:4, 1:4, 1:4] = True
    m[2, 2, 2] = False
    for corner in np.ndindex(2, 2, 2):
        m[tuple(1 + 2 * np.array(corner))] = False
    assert betti_numbers(m) == (1, 0, 1)


def test_mask_touching_the_array_border():
    # The padding inside betti_numbers makes the border harmless.
    full = np.ones((6, 6, 6), dtype=bool)
    assert betti_numbers(full) == (1, 0, 0)
    shell = full.copy()
    shell[1:5, 1:5, 1:5] = False
    assert betti_numbers(shell) == (1, 0, 1)
    tube = full.copy()
    tube[2:4, 2:4, :] = False  # a hole through the whole block along z
    assert betti_numbers(tube) == (1, 1, 0)


def test_betti_errors_and_bad_input():
    assert betti_errors(_torus(11, 4), _ball(10)) == (0, 1, 0)
    assert betti_errors(_ball(6, (-10, 0, 0)) | _ball(6, (10, 0, 0)), _ball(12) & ~_ball(8)) == (1, 0, 1)
    with pytest.raises(ValueError, match="3D"):
        betti_numbers(np.ones((4, 4), dtype=bool))

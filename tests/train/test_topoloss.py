"""The persistent-homology penalty: known answers on analytic shapes, gradients, and descent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from crossmodalnet.data.spec import MMWHS, DataSpec, LabelClass
from crossmodalnet.evaluate.topology import betti_numbers
from crossmodalnet.train.topoloss import persistence_diagram, persistence_penalty, persistence_terms, topology_loss

N = 16


def _grid() -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(N)] * 3, indexing="ij"), -1).astype(np.float64)


def _gaussian(centre, sigma: float) -> np.ndarray:
    return np.exp(-((_grid() - np.asarray(centre, dtype=float)) ** 2).sum(-1) / (2 * sigma**2))


def _solid() -> torch.Tensor:
    p = torch.zeros(N, N, N, dtype=torch.float64)
    p[4:12, 4:12, 4:12] = 1.0
    return p


def _two_blobs() -> torch.Tensor:
    """Two smooth blobs whose 0.5 level sets are separate; the saddle between them is ~0.3."""
    return torch.from_numpy(np.maximum(_gaussian((8, 5, 8), 1.6), _gaussian((8, 11, 8), 1.6)))


def _shell() -> torch.Tensor:
    p = torch.zeros(N, N, N, dtype=torch.float64)
    p[3:12, 3:12, 3:12] = 1.0
    p[5:10, 5:10, 5:10] = 0.0
    return p


def _torus() -> torch.Tensor:
    g = _grid() - 7.5
    ring = np.sqrt(g[..., 0] ** 2 + g[..., 1] ** 2) - 4.5
    return torch.from_numpy(((ring**2 + g[..., 2] ** 2) <= 1.6**2).astype(np.float64))


def test_persistence_counts_agree_with_the_betti_metric():
    """Bars alive at the 0.5 level of a binary mask are its Betti numbers (same cubical complex)."""
    rng = np.random.default_rng(0)
    masks = [_solid().numpy() > 0, _shell().numpy() > 0, _torus().numpy() > 0]
    masks += [ndimage.gaussian_filter(rng.random((12, 12, 12)), 1.2) > 0.5 for _ in range(10)]
    seen = set()
    for m in masks:
        ph = persistence_diagram(1.0 - m.astype(np.float64))
        alive = (ph[:, 1] <= 0.5) & (ph[:, 2] > 0.5)
        counts = tuple(int(((ph[:, 0] == d) & alive).sum()) for d in range(3))
        assert counts == betti_numbers(m)
        seen.add(tuple(c > 0 for c in counts))
    assert (True, True, False) in seen and (True, False, True) in seen  # tunnels and cavities were tested


def test_diagram_reports_the_voxels_of_birth_and_death_in_array_order():
    """An asymmetric array: gudhi numbers cells in Fortran order; the diagram must give (x, y, z)."""
    f = np.ones((3, 5, 7))
    f[2, 1, 6] = 0.1  # global minimum: the essential component is born here
    f[0, 3, 0] = 0.2  # a second minimum, separated by walls of 1.0: a finite bar [0.2, 1.0)
    ph = persistence_diagram(f)
    assert ph.shape == (2, 9)
    essential = ph[~np.isfinite(ph[:, 2])]
    finite = ph[np.isfinite(ph[:, 2])]
    assert essential[0, :2].tolist() == [0, 0.1] and tuple(essential[0, 3:6]) == (2, 1, 6)
    assert tuple(essential[0, 6:9]) == (-1, -1, -1)
    assert finite[0, :3].tolist() == [0, 0.2, 1.0] and tuple(finite[0, 3:6]) == (0, 3, 0)
    assert f[tuple(int(v) for v in finite[0, 6:9])] == 1.0
    # Every reported voxel holds the value of its bar end, on random arrays of odd shapes too.
    rng = np.random.default_rng(1)
    for shape in ((4, 9, 6), (11, 5, 7)):
        v = ndimage.gaussian_filter(rng.random(shape), 1.0)
        ph = persistence_diagram(v)
        assert np.array_equal(v[tuple(ph[:, 3:6].astype(int).T)], ph[:, 1])
        fin = np.isfinite(ph[:, 2])
        assert np.array_equal(v[tuple(ph[fin, 6:9].astype(int).T)], ph[fin, 2])
        assert int((~fin).sum()) == 1 and ph[~fin, 1] == v.min()  # one essential bar: the complex is a box


def test_single_solid_blob_costs_nothing():
    assert float(persistence_penalty(_solid())) == 0.0
    smooth = torch.from_numpy(_gaussian((8, 8, 8), 3.0))
    assert float(persistence_penalty(smooth / smooth.max())) == pytest.approx(0.0, abs=1e-12)


def test_two_blobs_cost_their_second_component():
    p = _two_blobs()
    terms = persistence_terms(p)
    assert betti_numbers(p.numpy() > 0.5) == (2, 0, 0)
    assert float(terms["components"]) > 0.3
    assert float(terms["tunnels"]) == 0.0 and float(terms["cavities"]) == 0.0


def test_hollow_shell_costs_its_cavity_and_a_torus_its_tunnel():
    shell, torus = persistence_terms(_shell()), persistence_terms(_torus())
    assert float(shell["cavities"]) == pytest.approx(1.0)
    assert float(shell["components"]) == 0.0
    assert float(torus["tunnels"]) == pytest.approx(1.0)
    assert float(torus["cavities"]) == 0.0


def test_uncertain_blob_is_pushed_towards_certainty():
    p = 0.7 * _solid()
    assert float(persistence_terms(p)["certainty"]) == pytest.approx(0.3**2)


def test_gradient_lives_on_the_critical_voxels():
    p = _two_blobs().clone().requires_grad_(True)
    persistence_penalty(p).backward()
    ph = persistence_diagram(1.0 - p.detach().numpy())
    finite0 = ph[(ph[:, 0] == 0) & np.isfinite(ph[:, 2])]
    assert len(finite0) >= 1
    top = finite0[np.argmax(finite0[:, 2] - finite0[:, 1])]
    birth, death = tuple(int(v) for v in top[3:6]), tuple(int(v) for v in top[6:9])
    # Persistence shrinks when the second blob's peak falls (birth of 1-p rises) and the saddle rises.
    assert p.grad[birth] > 0 and p.grad[death] < 0
    assert 0 < int((p.grad != 0).sum()) <= 2 * len(ph)


def test_gradient_steps_merge_two_blobs_and_fix_betti_0():
    logit = torch.logit(_two_blobs().clamp(1e-3, 1 - 1e-3)).clone().requires_grad_(True)
    opt = torch.optim.SGD([logit], lr=20.0)
    start = float(persistence_penalty(torch.sigmoid(logit.detach())))
    for _ in range(15):
        loss = persistence_penalty(torch.sigmoid(logit))
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = torch.sigmoid(logit).detach()
    assert float(persistence_penalty(p)) < 0.05 * start
    assert abs(betti_numbers(p.numpy() > 0.5)[0] - 1) < abs(betti_numbers(_two_blobs().numpy() > 0.5)[0] - 1)


def test_topology_loss_pools_skips_absent_structures_and_keeps_the_graph():
    probs = torch.zeros(2, 3, 32, 32, 32)
    probs[:, 0] = 1.0
    logits = torch.zeros_like(probs, requires_grad=True)
    empty = topology_loss(torch.softmax(logits, 1), size=16)  # every structure at 1/3 < 0.5: skipped
    assert float(empty.detach()) == 0.0 and empty.requires_grad
    two = torch.from_numpy(np.kron(_two_blobs().numpy(), np.ones((2, 2, 2)))).float()  # 32^3, pools back to 16^3
    probs[0, 2], probs[0, 0] = two, 1.0 - two
    value = topology_loss(probs, size=16)
    # Only sample 0's structure 2 qualifies; the mean over qualifying pairs is its penalty.
    assert float(value) == pytest.approx(float(persistence_penalty(_two_blobs().float())), rel=1e-4)


def test_max_pooling_keeps_a_one_voxel_speck_that_averaging_fades():
    probs = torch.zeros(1, 2, 32, 32, 32)
    probs[0, 1, 8:24, 8:24, 8:24] = 1.0  # one certain blob ...
    probs[0, 1, 28, 28, 28] = 0.9  # ... and a stray, less certain voxel: its own component
    probs[0, 0] = 1.0 - probs[0, 1]
    assert betti_numbers(probs[0, 1].numpy() > 0.5) == (2, 0, 0)
    # Averaged 2x2x2, the speck is a bar [1 - 0.9/8, 1) of f = 1 - p; kept by the maximum: [0.1, 1).
    assert float(topology_loss(probs, size=16, pool="avg")) == pytest.approx((0.9 / 8) ** 2, rel=1e-5)
    assert float(topology_loss(probs, size=16, pool="max")) == pytest.approx(0.9**2, rel=1e-5)
    # The gradient of the max-pooled penalty reaches the speck's voxel and pushes it down.
    p = probs.clone().requires_grad_(True)
    topology_loss(p, size=16, pool="max").backward()
    assert p.grad[0, 1, 28, 28, 28] > 0  # descent lowers p there


def test_bad_arguments():
    with pytest.raises(ValueError, match="3D"):
        persistence_diagram(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="D, H, W"):
        persistence_terms(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="B, C, D, H, W"):
        topology_loss(torch.zeros(3, 4, 4, 4))
    with pytest.raises(ValueError, match="size"):
        topology_loss(torch.zeros(1, 2, 4, 4, 4), size=1)
    with pytest.raises(ValueError, match="pool"):
        topology_loss(torch.zeros(1, 2, 4, 4, 4), pool="median")


# --- "decision" bars: only what changes the thresholded topology; fragments removed, holes filled ---


def _edge_blob() -> torch.Tensor:
    """A certain blob in the middle and a second one cut by the array's edge (a structure leaving the patch)."""
    p = _solid().clone()
    p[0:3, 6:10, 6:10] = 1.0
    return p


def _blob_and_fragment(amplitude: float | torch.Tensor = 0.9) -> torch.Tensor:
    """A blob and a smaller, dimmer fragment beside it, apart at the 0.5 level."""
    main = torch.from_numpy(_gaussian((8, 5, 8), 1.8))
    return torch.maximum(main, amplitude * torch.from_numpy(_gaussian((8, 11, 8), 1.4)))


def test_decision_bars_ignore_what_the_threshold_does_not_see():
    # Two peaks joined by a saddle near 0.7: one piece at the 0.5 level, so no fragment to remove.
    joined = 0.55 + 0.45 * _two_blobs() / _two_blobs().max()
    saddle = float(joined[8, 8, 8])
    assert saddle > 0.6 and betti_numbers(joined.numpy() > 0.5) == (1, 0, 0)
    assert float(persistence_terms(joined, bars="all")["components"]) > 0.0
    assert float(persistence_terms(joined, bars="decision")["components"]) == 0.0
    # A fragment cut by the edge may be the rest of the structure: left alone; inside the array it counts.
    assert betti_numbers(_edge_blob().numpy() > 0.5) == (2, 0, 0)
    assert float(persistence_terms(_edge_blob(), bars="decision")["components"]) == 0.0
    assert float(persistence_terms(_edge_blob(), bars="all")["components"]) == pytest.approx(1.0)
    assert betti_numbers(_blob_and_fragment().numpy() > 0.5) == (2, 0, 0)
    assert float(persistence_terms(_blob_and_fragment(), bars="decision")["components"]) > 0.3


def test_decision_bars_remove_fragments_and_fill_holes():
    # Fragments: the gradient lowers the second peak and leaves the saddle alone (no bridge).
    p = _blob_and_fragment().clone().requires_grad_(True)
    persistence_penalty(p, bars="decision").backward()
    ph = persistence_diagram(1.0 - p.detach().numpy())
    finite0 = ph[(ph[:, 0] == 0) & np.isfinite(ph[:, 2])]
    top = finite0[np.argmax(finite0[:, 2] - finite0[:, 1])]
    birth, death = tuple(int(v) for v in top[3:6]), tuple(int(v) for v in top[6:9])
    assert p.grad[birth] > 0 and p.grad[death] == 0
    # Holes: the gradient raises p at the voxel that kills the cavity / tunnel, and nowhere on the wall.
    for shape, dim in ((_shell(), 2), (_torus(), 1)):
        q = shape.clone().requires_grad_(True)
        persistence_penalty(q, bars="decision").backward()
        bar = persistence_diagram(1.0 - shape.numpy())
        bar = bar[bar[:, 0] == dim][0]
        assert q.grad[tuple(int(v) for v in bar[6:9])] < 0  # descent raises p: fills
        assert q.grad[tuple(int(v) for v in bar[3:6])] == 0
        assert float((q.grad > 0).sum()) == 0  # nothing is lowered: no wall is broken


def test_decision_descent_removes_the_fragment_without_new_tunnels_or_cavities():
    """A fragment whose amplitude is one shared parameter (as a network's weights move a whole region):
    descent on the decision penalty lowers it until the fragment is gone, and builds no bridge."""
    amplitude = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([amplitude], lr=0.5)
    for _ in range(40):
        loss = persistence_penalty(_blob_and_fragment(amplitude), bars="decision")
        opt.zero_grad()
        loss.backward()
        opt.step()
    p = _blob_and_fragment(amplitude).detach()
    assert betti_numbers(p.numpy() > 0.5) == (1, 0, 0)
    assert amplitude.item() < 0.5 and float(persistence_penalty(p, bars="decision")) == 0.0
    assert float(p.max()) == pytest.approx(1.0)  # the kept blob (the essential bar) is untouched


def _ring(channels: int, wall: int, pool: int) -> torch.Tensor:
    """(1, channels, N, N, N) probabilities: a pool (a tube crossing the patch) and its wall around it."""
    g = _grid() - 7.5
    r = np.sqrt(g[..., 1] ** 2 + g[..., 2] ** 2)
    probs = torch.zeros(1, channels, N, N, N, dtype=torch.float64)
    probs[0, pool] = torch.from_numpy((r <= 3.0).astype(np.float64))  # a blood pool crossing the patch
    probs[0, wall] = torch.from_numpy(((r > 3.0) & (r <= 5.5)).astype(np.float64))  # its wall
    probs[0, 0] = 1.0 - probs[0, 1:].sum(0)
    return probs


def test_a_wrapping_structure_takes_its_holes_from_the_union_with_what_it_wraps():
    """The myocardium cut by a patch is a ring around the LV: not a defect. Its own tunnel must
    not be filled (that would paint MYO over the LV); the union MYO + LV is what must be solid.
    The prior is the dataset's (`encloses`, MM-WHS: MYO wraps LV); without one it is off."""
    encloses = dict(MMWHS.enclosures)
    myo, lv = MMWHS.index("MYO"), MMWHS.index("LV")
    assert encloses == {myo: (lv,)}
    probs = _ring(MMWHS.num_classes, myo, lv)
    assert betti_numbers(probs[0, myo].numpy() > 0.5) == (1, 1, 0)
    for prior in (None, encloses):
        assert float(topology_loss(probs, size=N, bars="all", encloses=prior)) > 0.0  # the first version fills the ring
    # No prior (the default, a dataset that says nothing): the ring's tunnel is a defect of MYO, the one
    # structure of two that has one; mean over (sample, structure) = 1 / 2 for that one bar.
    assert float(topology_loss(probs, size=N, bars="decision")) == pytest.approx(0.5)
    assert float(topology_loss(probs, size=N, bars="decision", encloses=None)) == pytest.approx(0.5)
    assert float(topology_loss(probs, size=N, bars="decision", encloses={})) == pytest.approx(0.5)
    # With the MM-WHS prior the ring is MYO + LV, solid: nothing to pay.
    assert float(topology_loss(probs, size=N, bars="decision", encloses=encloses)) == 0.0
    # A hole through wall *and* pool (a defect of both) still costs, and the gradient fills it.
    holed = probs.clone()
    holed[0, [myo, lv], 6:10, 6:10, 6:10] = 0.0
    holed[0, 0] = 1.0 - holed[0, 1:].sum(0)
    holed.requires_grad_(True)
    loss = topology_loss(holed, size=N, bars="decision", encloses=encloses)
    assert float(loss.detach()) > 0.0
    loss.backward()
    assert float(holed.grad[0, [myo, lv], 6:10, 6:10, 6:10].min()) < 0  # descent raises p in the hole


def test_the_enclosure_prior_is_the_datasets_whatever_its_classes():
    """Any dataset may name enclosures (class indices of its own spec, any number of classes): the
    prior follows `encloses`, not the MM-WHS table (which once needed all 8 MM-WHS channels)."""
    spec = DataSpec(channels=("T2",), classes=(LabelClass("pool", 10), LabelClass("wall", 20, encloses=("pool",))))
    pool, wall = spec.index("pool"), spec.index("wall")
    assert dict(spec.enclosures) == {wall: (pool,)} and spec.num_classes == 3
    probs = _ring(spec.num_classes, wall, pool)
    assert float(topology_loss(probs, size=N, bars="decision")) == pytest.approx(0.5)
    assert float(topology_loss(probs, size=N, bars="decision", encloses=dict(spec.enclosures))) == 0.0
    # A prior on the other class (the pool, 1, wrapping the wall) leaves the wall's own tunnel a defect.
    assert float(topology_loss(probs, size=N, bars="decision", encloses={1: (2,)})) == pytest.approx(0.5)


def test_split_pooling_sees_a_one_voxel_cavity_and_fills_that_voxel():
    probs = torch.zeros(1, 2, 32, 32, 32)
    probs[0, 1, 6:26, 6:26, 6:26] = 1.0  # a thick solid structure ...
    probs[0, 1, 15, 16, 17] = 0.0  # ... with a one-voxel cavity (an error of the full-resolution map)
    probs[0, 0] = 1.0 - probs[0, 1]
    assert betti_numbers(probs[0, 1].numpy() > 0.5) == (1, 0, 1)
    # Averaged 2x2x2 the cavity is 7/8 full: unseen. Min-pooled it is a pooled cavity.
    assert float(topology_loss(probs, size=16, pool="avg", bars="decision")) == 0.0
    p = probs.clone().requires_grad_(True)
    loss = topology_loss(p, size=16, pool="split", bars="decision")
    assert float(loss.detach()) == pytest.approx(1.0)
    loss.backward()
    assert p.grad[0, 1, 15, 16, 17] < 0  # descent raises p at the voxel at fault ...
    assert int((p.grad[0, 1] != 0).sum()) == 1  # ... and nowhere else
    # A thin (one-voxel) wall stays whole in the max-pooled map: no fragment to remove.
    wall = torch.zeros(1, 2, 32, 32, 32)
    wall[0, 1, 8:24, 8:24, 15] = 1.0
    wall[0, 0] = 1.0 - wall[0, 1]
    assert float(topology_loss(wall, size=16, pool="split", bars="decision")) == 0.0

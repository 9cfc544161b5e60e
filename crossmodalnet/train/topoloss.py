"""Differentiable topology penalty of JADA: persistent homology of predicted probabilities.

Each structure of a heart is one connected piece without tunnels or cavities (Betti numbers
(1, 0, 0)); a segmentation that breaks a ventricle in two, or leaves a hole in the myocardium, is
wrong in a way Dice barely sees. The penalty pushes a probability map p (D, H, W) towards that
topology:

- persistence of the superlevel sets {p >= t} (computed as the sublevel persistence of f = 1 - p,
  cubical complex of the T-construction: voxels are closed cubes, so the foreground is
  26-connected exactly as in `evaluate.topology.betti_numbers`), by gudhi (MIT licence);
- dimension 0: the one essential bar is the component kept; every finite bar (a second component)
  should vanish: sum of (death - birth)^2; and the kept component should be certain: birth^2,
  i.e. (1 - max p)^2;
- dimensions 1 (tunnels) and 2 (cavities): sum of (death - birth)^2 over all bars.

The persistence pairs are computed without gradient; their birth and death values are then
gathered from the tensor at the critical voxels gudhi reports (`cofaces_of_persistence_pairs`:
the voxel whose value creates and the one whose value kills each bar), so autograd moves exactly
those voxels (the usual piecewise gradient of persistence: the pairing is fixed within a step).

    loss = topology_loss(probs)        # probs (B, C, D, H, W) softmax -> scalar tensor

Which bars, and which end of each bar moves (`bars`):

- "all" (the first version): every bar, both ends. Measured in JADA (docs/benchmarks.md): the
  components term lowered the Betti-0 error but raised tunnels and cavities, because half of
  its gradient raises the saddle between two fragments, i.e. builds a bridge, and bridges close
  loops and shells.
- "decision": only bars that straddle the decision level (birth p >= level - margin and death
  p <= level + margin), the ones that change the topology of the thresholded segmentation; a
  fragment is *removed* (gradient at its peak only) and a tunnel or cavity is *filled*
  (gradient at the voxel that kills it only): the anatomical prior is one solid piece, and
  neither move creates new topology. A fragment whose level set touches the patch edge is left
  alone (it may be the rest of the structure, cut off by the patch), and so is the largest piece.
  A structure that wraps others (the label table's `encloses`: the myocardium around the LV
  blood pool, a ring in most patches) has its tunnels and cavities taken from its union with
  them, which is solid: filling the myocardium's own hole would paint it over the LV (measured:
  LV Dice 0.05 on the target phantoms when it was not so).

`topology_loss` first pools the probabilities to at most `size`^3 (persistence costs grow fast
with the voxel count, and small noise bars vanish), and skips structures that the pooled map
does not predict anywhere (max p < threshold): a patch need not contain every structure, and
the birth term would otherwise invent one.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

BARS: tuple[str, ...] = ("all", "decision")

__all__ = ["BARS", "POOLS", "persistence_diagram", "persistence_terms", "persistence_penalty", "topology_loss"]


def persistence_diagram(values: np.ndarray, maxdim: int = 2) -> np.ndarray:
    """Sublevel persistence of a 3D array (T-construction): (n, 9) float64 rows
    [dim, birth, death, birth voxel x, y, z, death voxel x, y, z]; essential bars have death inf
    (and death voxel -1). Bars of zero length are left out; rows are sorted by dimension.

    By gudhi's cubical complex built from top-dimensional cells: every voxel is a closed cube
    with its value and a lower-dimensional cell takes the minimum over the cubes that contain it,
    so a sublevel set is a union of closed voxel cubes (26-connected, as `evaluate.topology`).
    """
    import gudhi

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 3:
        raise ValueError(f"expected a 3D array, got shape {values.shape}")
    complex_ = gudhi.CubicalComplex(top_dimensional_cells=values)
    complex_.compute_persistence()
    regular, essential = complex_.cofaces_of_persistence_pairs()
    flat = values.reshape(-1, order="F")  # gudhi numbers the cells of an array in Fortran order
    blocks = []
    for dim in range(min(maxdim + 1, 3)):
        pairs = np.asarray(regular[dim] if dim < len(regular) else [], dtype=np.int64).reshape(-1, 2)
        born = np.asarray(essential[dim] if dim < len(essential) else [], dtype=np.int64).reshape(-1)
        birth = np.concatenate([pairs[:, 0], born])
        death = np.concatenate([pairs[:, 1], np.full(len(born), -1)])
        death_xyz = np.full((len(death), 3), -1.0)
        death_xyz[: len(pairs)] = np.stack(np.unravel_index(pairs[:, 1], values.shape, order="F"), 1)
        blocks.append(np.column_stack([
            np.full(len(birth), dim), flat[birth], np.where(death >= 0, flat[death], np.inf),
            np.stack(np.unravel_index(birth, values.shape, order="F"), 1), death_xyz,
        ]).astype(np.float64).reshape(-1, 9))
    ph = np.concatenate(blocks) if blocks else np.zeros((0, 9))
    return ph[ph[:, 2] > ph[:, 1]]  # pairs whose two cells tie carry no topology and no gradient


def persistence_terms(prob: torch.Tensor, bars: str = "all", level: float = 0.5,
                      margin: float = 0.1) -> dict[str, torch.Tensor]:
    """The penalty's parts for one structure's probabilities prob (D, H, W) in [0, 1].

    Returns scalar tensors {"components": finite dim-0 bars, "certainty": (1 - max p)^2 of the
    kept component, "tunnels": dim-1 bars, "cavities": dim-2 bars}, each differentiable in prob.
    `bars` "all" or "decision" (module docstring); `level` and `margin` define "decision".
    """
    if prob.dim() != 3:
        raise ValueError(f"expected probabilities (D, H, W), got shape {tuple(prob.shape)}")
    if bars not in BARS:
        raise ValueError(f"bars must be one of {BARS}, got {bars!r}")
    f = 1.0 - prob
    values = f.detach().cpu().numpy()
    if bars == "decision":
        # Only bars with birth p >= level - margin count, and all of them live in the bounding box
        # of those voxels (plus one voxel): the diagram of that box costs a fraction of the whole.
        inside = np.argwhere(values <= 1.0 - (level - margin))
        if not len(inside):
            ph = np.zeros((0, 9))
        else:
            lo = np.maximum(inside.min(0) - 1, 0)
            hi = np.minimum(inside.max(0) + 2, values.shape)
            ph = persistence_diagram(values[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
            ph[:, 3:6] += lo
            ph[np.isfinite(ph[:, 2]), 6:9] += lo
            ph = _decision_bars(ph, 1.0 - values, level, margin)
    else:
        ph = persistence_diagram(values)
    flat = f.reshape(-1)
    zero = flat.sum() * 0.0  # keeps the graph (and the device, dtype) when there is nothing to penalise
    if not len(ph):
        return {"components": zero, "certainty": zero, "tunnels": zero, "cavities": zero}
    shape = f.shape

    def gather(coords: np.ndarray) -> torch.Tensor:
        idx = np.ravel_multi_index(tuple(np.rint(coords).astype(np.int64).T), shape)
        return flat[torch.as_tensor(idx, device=flat.device)]

    dim, finite = ph[:, 0].astype(int), np.isfinite(ph[:, 2])
    birth = gather(ph[:, 3:6])
    death = torch.zeros_like(birth)
    if finite.any():
        death[torch.as_tensor(finite, device=flat.device)] = gather(ph[finite, 6:9])

    if bars == "decision":
        # Remove fragments (move the peak, not the saddle); fill tunnels and cavities (move the
        # voxel that kills them, not the one that closes them).
        fixed = torch.as_tensor(dim == 0, device=flat.device)
        birth, death = torch.where(fixed, birth, birth.detach()), torch.where(fixed, death.detach(), death)

    def squared_persistence(d: int) -> torch.Tensor:
        sel = torch.as_tensor((dim == d) & finite, device=flat.device)
        return ((death - birth)[sel] ** 2).sum() if bool(sel.any()) else zero

    essential = torch.as_tensor((dim == 0) & ~finite, device=flat.device)
    return {
        "components": squared_persistence(0),
        "certainty": (birth[essential] ** 2).sum() if bool(essential.any()) else zero,
        "tunnels": squared_persistence(1),
        "cavities": squared_persistence(2),
    }


def _decision_bars(ph: np.ndarray, prob: np.ndarray, level: float, margin: float) -> np.ndarray:
    """The rows of a diagram of f = 1 - prob that change the topology of {prob >= level}.

    Kept: the essential component, and finite bars with birth p >= level - margin and death
    p <= level + margin; dropped: finite components whose peak's connected piece of
    {prob >= level - margin} touches the array's edge (a structure cut by the patch) or is the
    largest piece (the structure itself, when a brighter speck took the essential bar).
    """
    finite = np.isfinite(ph[:, 2])
    p_birth, p_death = 1.0 - ph[:, 1], np.where(finite, 1.0 - ph[:, 2], -np.inf)
    keep = ~finite | ((p_birth >= level - margin) & (p_death <= level + margin))
    fragments = keep & finite & (ph[:, 0] == 0)
    if fragments.any():
        pieces, _ = ndimage.label(prob >= level - margin, structure=np.ones((3, 3, 3)))  # 26-connected
        spared = np.unique(np.concatenate([pieces[[0, -1]].ravel(), pieces[:, [0, -1]].ravel(),
                                           pieces[:, :, [0, -1]].ravel()]))
        if pieces.max() > 0:  # the largest piece is the structure, whichever peak gudhi calls essential
            spared = np.append(spared, np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
        peak = pieces[tuple(ph[fragments, 3:6].astype(np.int64).T)]
        keep[np.flatnonzero(fragments)[np.isin(peak, spared[spared > 0])]] = False
    return ph[keep]


def persistence_penalty(prob: torch.Tensor, bars: str = "all", level: float = 0.5,
                        margin: float = 0.1) -> torch.Tensor:
    """Scalar penalty of one structure's probabilities (D, H, W): 0 for a certain single blob."""
    return torch.stack(list(persistence_terms(prob, bars, level, margin).values())).sum()


POOLS: tuple[str, ...] = ("avg", "max", "split")


def _pool(x: torch.Tensor, out: list[int], how: str) -> torch.Tensor:
    if how == "avg":
        return F.adaptive_avg_pool3d(x, out)
    if how == "max":
        return F.adaptive_max_pool3d(x, out)
    return -F.adaptive_max_pool3d(-x, out)  # "min"


def topology_loss(probs: torch.Tensor, size: int = 16, threshold: float = 0.5,
                  include_background: bool = False, pool: str = "avg", bars: str = "all",
                  margin: float = 0.1, encloses: Mapping[int, tuple[int, ...]] | None = None) -> torch.Tensor:
    """Mean persistence penalty over (sample, structure) pairs of softmax probs (B, C, D, H, W).

    The probabilities are pooled to at most `size` voxels per axis first (`pool`):
    - "avg": small specks fade below the level sets that matter and cost little; thin walls fade
      too (into fragments), and holes narrower than a window vanish;
    - "max": every speck of foreground survives as a component of the pooled map, so stray
      fragments are penalised however small, and thin walls stay whole; holes narrower than a
      pooling window close;
    - "split": components (and certainty) from the max-pooled map, tunnels and cavities from the
      min-pooled map: a fragment of the pooled map is a fragment at full resolution, and a hole
      of one voxel at full resolution is a hole of the pooled map; either gradient lands on the
      very voxel at fault (the window's maximum, the window's minimum). Two diagrams a structure.
    A structure enters only when its pooled maximum reaches `threshold` (predicted somewhere in
    the patch); `threshold` is also the decision level of `bars` "decision", which also takes
    the holes of an enclosing structure from its union with what it encloses (`encloses`: class
    index -> the indices it wraps, the dataset's `DataSpec.enclosures`; none when the dataset
    says nothing). Returns 0 (still attached to the graph) when no structure qualifies.
    """
    if probs.dim() != 5:
        raise ValueError(f"expected probabilities (B, C, D, H, W), got shape {tuple(probs.shape)}")
    if size < 2:
        raise ValueError(f"size must be at least 2, got {size}")
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    out = [min(int(s), int(size)) for s in probs.shape[2:]]
    source = probs.float()
    components, holes = ("max", "min") if pool == "split" else (pool, pool)
    nested = bars == "decision" and bool(encloses)
    pooled = _pool(source, out, components)
    first = 0 if include_background else 1
    present = pooled[:, first:].detach().flatten(2).amax(2) >= threshold  # B, C'
    penalties = []
    for b, c in present.nonzero().tolist():
        k = first + c
        wrapped = tuple(encloses.get(k, ())) if nested else ()
        if holes == components and not wrapped:  # one map serves every term
            penalties.append(persistence_penalty(pooled[b, k], bars, threshold, margin))
            continue
        # The hole map: an enclosing structure is solid together with what it wraps.
        region = source[b, [k, *wrapped]].sum(0).clamp(max=1.0)
        hole_map = _pool(region[None, None], out, holes)[0, 0]
        own = persistence_terms(pooled[b, k], bars, threshold, margin)
        hole = persistence_terms(hole_map, bars, threshold, margin)
        penalties.append(own["components"] + own["certainty"] + hole["tunnels"] + hole["cavities"])
    if not penalties:
        return pooled.sum() * 0.0
    return torch.stack(penalties).mean()

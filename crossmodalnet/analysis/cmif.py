"""Cross-modal information flow (Def. 7 of the paper), measured layer by layer on a real model.

    results = measure_cmif("runs/cmn", "data/phantoms", cases=3, estimators=("gaussian", "ksg"))
    write_cmif(results, "runs/cmn/cmif")          # cmif.csv, cmif.json, cmif.png

CMIF is defined between two streams. The model has one stream per input channel of the dataset
(`config.modalities`); the flow is measured between one chosen pair of channels, `pair` = (a, b),
by default (0, 1), the dataset's first two channels (CT and MR on MM-WHS). Mutual information is
symmetric, so (a, b) and (b, a) give the same numbers: with 3-4 channels, measure each unordered
pair of interest with its own call. A single-channel model has no pair: it is refused.

For every case, the two streams' features are taken at each depth l of the encoder and
I(F_a^l; F_b^l) is estimated with spatial positions as samples (`analysis.mi`). The depths, in
order (l = 0, 1, 2, ...):

- ``input``: the normalised volumes of channels a and b themselves (one channel each, voxels as
  samples); this is the paper's F^0 = x (Eq. 1);
- ``stem``: the conv-stem token maps (stride `patch_size`), before Swin stage 1;
- ``stage<i>`` / ``cross<i>``: the tokens after Swin stage i and after Cross Transformer block i.

CMIF(l) = I(F_a^l; F_b^l) − I(F_a^{l−1}; F_b^{l−1}) along that sequence, per case, then the mean
and the standard deviation over cases. Three models are measured: the trained run, an untrained
model of the same configuration (same seed for its initialisation), and the ablation without
Cross Transformer blocks (`cross_blocks=False`; untrained unless a run of it is given).

Inputs are what the model saw: the run's own preprocessing (`preprocess.json`), then a centred
crop of at most the training patch size (the sliding-window roi) and zero padding to a multiple
of `model.divisors` (per axis); features of padded positions are dropped. Only cases with every channel are
used. Feature maps are (P, C) per stream, P positions; a layer of a 64³ crop has 64³ (input),
16³ (stem, stage 1), 8³, 4³ positions.

Caveat written into the results: samples are positions, and deeper layers have fewer of them and
see larger neighbourhoods, so the data processing inequality does not order these numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossmodalnet.analysis.cases import AnalysisCase, check_pair, load_analysis_cases
from crossmodalnet.analysis.mi import MI_ESTIMATORS, estimate_mi
from crossmodalnet.config import ModelConfig, from_dict, to_dict
from crossmodalnet.data.dataset import read_spec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.files import atomic_path, write_csv
from crossmodalnet.infer import load_run
from crossmodalnet.models.registry import build_model

__all__ = [
    "LAYER0",
    "AnalysisCase",
    "load_analysis_cases",
    "check_pair",
    "layer_features",
    "layer_dim",
    "information_flow",
    "summarize_flow",
    "check_settings",
    "untrained_model",
    "measure_cmif",
    "json_safe",
    "write_cmif",
    "cmif_from_cli",
]

LAYER0 = ("l=0 is 'input': the normalised volumes of the two channels (what the network receives), voxels as samples; "
          "'stem' (l=1) is the conv-stem token maps before Swin stage 1")
_CAVEAT = ("samples are spatial positions; deeper layers have fewer positions and larger receptive fields, "
           "so the data processing inequality does not order these values")
# Positions per joint dimension below which a layer's PCA dimension is lowered: the deepest stage of
# a 64³ crop has only 64 tokens, too few for 2 x 8 dimensions (Gaussian needs N > 2d + 1 at the very least).
_SAMPLES_PER_DIM = 4
_CSV_COLUMNS = ("model", "estimator", "depth", "layer", "kind", "positions", "channels", "pca_dim", "cases",
                "mi_mean", "mi_std", "cmif_mean", "cmif_std")


def _kind(name: str) -> str:
    return name.rstrip("0123456789")


@torch.no_grad()
def layer_features(
    model: nn.Module, image: torch.Tensor, pair: Sequence[int] = (0, 1)
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(name, F_a (P, C), F_b (P, C)), ...] at every depth for channels (a, b) = `pair`, float32 on the CPU.

    image: (1, M, D, H, W) normalised, every channel present. Names: input, stem, stage1, cross1,
    stage2, ... (no cross* without Cross Transformer blocks). Padding to `model.divisors` is added
    here and its positions removed from every map.
    """
    a, b = check_pair(model, pair)
    if image.ndim != 5 or image.shape[0] != 1 or image.shape[1] != model.modalities:
        raise ValueError(f"image must be (1, {model.modalities}, D, H, W), got {tuple(image.shape)}")
    model.eval()
    device = next(model.parameters()).device
    size = image.shape[2:]
    pad = [(-s) % d for s, d in zip(size, model.divisors, strict=True)]
    x = F.pad(image, (0, pad[2], 0, pad[1], 0, pad[0])).to(device)

    def valid(f: torch.Tensor) -> torch.Tensor:
        """(1, d, h, w, C) channels-last on the padded grid -> (P, C) of the real positions."""
        stride = (x.shape[2] // f.shape[1])
        d, h, w = (math.ceil(s / stride) for s in size)
        return f[0, :d, :h, :w].reshape(-1, f.shape[-1]).float().cpu()

    def voxels(i: int) -> torch.Tensor:
        return image[0, i].reshape(-1, 1).float()

    layers = [("input", voxels(a), voxels(b))]
    stems = [model.streams[i].stem(x[:, i: i + 1])[-1].permute(0, 2, 3, 4, 1) for i in (a, b)]
    layers.append(("stem", valid(stems[0]), valid(stems[1])))
    _, _, _, deep = model.encode(x, keep_layers=True)
    layers += [(name, valid(feats[a]), valid(feats[b])) for name, feats in deep]
    return layers


def layer_dim(pca_dim: int, channels: int, positions: int) -> int:
    """PCA dimension used for a layer: at most `pca_dim` and the channels, and small enough that the
    joint space (2 d dims) has at least `_SAMPLES_PER_DIM` positions per dimension; 0 = too few positions."""
    return max(0, min(pca_dim, channels, positions // (2 * _SAMPLES_PER_DIM)))


def information_flow(
    model: nn.Module,
    cases: Sequence[AnalysisCase],
    estimators: Sequence[str] = ("gaussian",),
    pca_dim: int = 4,
    max_samples: int = 4096,
    seed: int = 0,
    pair: Sequence[int] = (0, 1),
) -> list[dict[str, Any]]:
    """Per-layer MI between channels `pair` of one model over cases: [{"name", "kind", "positions",
    "channels", "mi": {estimator: [nats per case]}}, ...] in depth order (see `layer_features`)."""
    for est in estimators:
        if est not in MI_ESTIMATORS:
            raise CrossModalNetError(f"unknown estimator {est!r}; choose from {list(MI_ESTIMATORS)}")
    check_pair(model, pair)
    layers: list[dict[str, Any]] = []
    for case in cases:
        feats = layer_features(model, case.image, pair)
        if not layers:
            layers = [{"name": n, "kind": _kind(n), "positions": int(fa.shape[0]), "channels": int(fa.shape[1]),
                       "dim": layer_dim(pca_dim, int(fa.shape[1]), int(fa.shape[0])),
                       "mi": {e: [] for e in estimators}} for n, fa, _ in feats]
        for row, (name, fa, fb) in zip(layers, feats, strict=True):
            if row["name"] != name:
                raise RuntimeError(f"layer order changed between cases: {row['name']} vs {name}")
            for est in estimators:
                value = math.nan if row["dim"] == 0 else estimate_mi(
                    fa, fb, est, pca_dim=row["dim"], max_samples=max_samples, seed=seed)
                row["mi"][est].append(value)
    return layers


def _spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single case)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarize_flow(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add depth, per-estimator mean/std of MI and CMIF(l) (per-case differences) to each layer row."""
    out = []
    for depth, row in enumerate(layers):
        new = {**row, "depth": depth, "mi_mean": {}, "mi_std": {}, "cmif": {}, "cmif_mean": {}, "cmif_std": {}}
        for est, values in row["mi"].items():
            new["mi_mean"][est], new["mi_std"][est] = _spread(values)
            if depth == 0:
                continue
            diff = [a - b for a, b in zip(values, layers[depth - 1]["mi"][est], strict=True)]
            new["cmif"][est] = diff
            new["cmif_mean"][est], new["cmif_std"][est] = _spread(diff)
        out.append(new)
    return out


def check_settings(pca_dim: int, max_samples: int) -> None:
    """Refuse estimator settings that cannot work, naming the option."""
    if pca_dim < 1:
        raise CrossModalNetError(f"--pca-dim must be >= 1, got {pca_dim}")
    if max_samples < 16:
        raise CrossModalNetError(f"--max-samples must be >= 16, got {max_samples}")


def untrained_model(config: ModelConfig, seed: int = 0, **overrides: Any) -> nn.Module:
    """A freshly initialised model of `config` (with `overrides`), reproducible by `seed`, in eval mode."""
    cfg = from_dict(ModelConfig, {**to_dict(config), **overrides})
    torch.manual_seed(seed)
    return build_model(cfg.name, cfg).eval()


def measure_cmif(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    cases: int = 3,
    estimators: Sequence[str] = ("gaussian", "ksg"),
    pca_dim: int = 4,
    max_samples: int = 4096,
    ablation_run: str | os.PathLike | None = None,
    split: str | None = None,
    device: str | torch.device | None = "cpu",
    seed: int = 0,
    pair: Sequence[int] = (0, 1),
) -> dict[str, Any]:
    """Information flow between channels `pair` (see the module docstring) of the trained run, an
    untrained twin and the no-cross-block ablation.

    Returns a JSON-ready dict: settings, the case ids, the pair (indices and channel names) and, per
    model, its summarised layers (`summarize_flow`) and a description of what the model is.
    """
    check_settings(pca_dim, max_samples)
    start = time.monotonic()
    run = load_run(run_dir, device)
    if run.config.model.name != "crossmodalnet":
        raise CrossModalNetError(f"{run_dir}: cmif needs a crossmodalnet run, this one is {run.config.model.name!r}")
    try:
        a, b = check_pair(run.model, pair)
    except CrossModalNetError as exc:
        raise CrossModalNetError(f"{run_dir}: {exc}") from None
    spec = read_spec(data_dir)
    if spec.num_channels != run.model.modalities:
        raise CrossModalNetError(f"{data_dir}: {spec.num_channels} channel(s) ({', '.join(spec.channels)}), the run's "
                                 f"model takes {run.model.modalities}")
    loaded = load_analysis_cases(data_dir, run.preprocessor, cases, split, run.config.patch_size)
    models: dict[str, tuple[nn.Module, str]] = {
        "trained": (run.model, f"trained run {run_dir}"),
        "untrained": (untrained_model(run.config.model, seed).to(run.device),
                      f"same configuration, untrained (initialised with seed {seed})"),
    }
    if ablation_run is not None:
        ablation = load_run(ablation_run, device)
        if ablation.config.model.cross_blocks:
            raise CrossModalNetError(f"{ablation_run}: --ablation-run must be trained with cross_blocks: false")
        if ablation.config.model.modalities != run.config.model.modalities:
            raise CrossModalNetError(f"{ablation_run}: --ablation-run takes {ablation.config.model.modalities} "
                                     f"channel(s), the run {run.config.model.modalities}")
        models["no_cross_blocks"] = (ablation.model, f"trained ablation run {ablation_run} (cross_blocks=False)")
    elif run.config.model.cross_blocks:
        models["no_cross_blocks"] = (untrained_model(run.config.model, seed, cross_blocks=False).to(run.device),
                                     f"ablation cross_blocks=False, untrained (initialised with seed {seed})")
    results: dict[str, Any] = {
        "run": str(run_dir), "data": str(data_dir), "cases": [c.id for c in loaded],
        "pair": [a, b], "pair_channels": [spec.channels[a], spec.channels[b]],
        "case_shape": list(loaded[0].image.shape[2:]), "estimators": list(estimators), "pca_dim": pca_dim,
        "max_samples_ksg": max_samples, "layer0": LAYER0, "caveat": _CAVEAT, "models": {},
    }
    for key, (model, description) in models.items():
        flow = information_flow(model, loaded, estimators, pca_dim, max_samples, seed, (a, b))
        results["models"][key] = {"description": description, "layers": summarize_flow(flow)}
    results["seconds"] = time.monotonic() - start
    return results


def _csv_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, model in results["models"].items():
        for est in results["estimators"]:
            for layer in model["layers"]:
                rows.append({
                    "model": key, "estimator": est, "depth": layer["depth"], "layer": layer["name"],
                    "kind": layer["kind"], "positions": layer["positions"], "channels": layer["channels"],
                    "pca_dim": layer["dim"], "cases": len(layer["mi"][est]),
                    "mi_mean": layer["mi_mean"][est], "mi_std": layer["mi_std"][est],
                    "cmif_mean": layer["cmif_mean"].get(est), "cmif_std": layer["cmif_std"].get(est),
                })
    return rows


def plot_cmif(results: dict[str, Any], path: str | os.PathLike) -> Path:
    """Two panels against depth: I(F_a^l; F_b^l) and CMIF(l), one line per model and estimator."""
    # A bare Figure (no pyplot): the caller's backend and figures are untouched; savefig uses Agg.
    from matplotlib.figure import Figure  # heavy: matplotlib loads only when a plot is drawn

    names: list[str] = []
    for model in results["models"].values():  # union of layer names, in depth order
        for layer in model["layers"]:
            if layer["name"] not in names:
                names.append(layer["name"])
    names.sort(key=lambda n: max(layer["depth"] for m in results["models"].values() for layer in m["layers"]
                                 if layer["name"] == n))
    fig = Figure(figsize=(13, 4.8))
    axes = fig.subplots(1, 2)
    styles = {"gaussian": "-o", "ksg": "--s"}  # line style per estimator, colour per model
    for colour, (key, model) in enumerate(results["models"].items()):
        for est in results["estimators"]:
            style = dict(fmt=styles.get(est, "-"), color=f"C{colour}", capsize=3, label=f"{key} ({est})")
            xs = [names.index(layer["name"]) for layer in model["layers"]]
            axes[0].errorbar(xs, [layer["mi_mean"][est] for layer in model["layers"]],
                             yerr=[layer["mi_std"][est] for layer in model["layers"]], **style)
            rest = model["layers"][1:]
            axes[1].errorbar(xs[1:], [layer["cmif_mean"][est] for layer in rest],
                             yerr=[layer["cmif_std"][est] for layer in rest], **style)
    axes[0].set(title="I(F_a^l; F_b^l), mean ± std over cases", ylabel="nats")
    axes[1].set(title="CMIF(l) = I(l) − I(l−1)", ylabel="nats")
    axes[1].axhline(0.0, color="k", lw=0.8)
    for ax in axes:
        ax.set_xticks(range(len(names)), names, rotation=30)
        ax.set_xlabel("depth")
    # One legend below both panels: inside, it hides curves.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(results["estimators"]) * 3, fontsize=8)
    between = " between " + " and ".join(results["pair_channels"]) if results.get("pair_channels") else ""
    fig.suptitle(f"cross-modal information flow{between}, {len(results['cases'])} case(s), PCA dim "
                 f"{results['pca_dim']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return Path(path)


def json_safe(value: Any) -> Any:
    """NaN and infinities -> None (strict JSON has no NaN); recurses into dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_cmif(results: dict[str, Any], out: str | os.PathLike) -> dict[str, Path]:
    """Write cmif.csv (one row per model, estimator and layer), cmif.json and cmif.png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": write_csv(out / "cmif.csv", _CSV_COLUMNS, _csv_rows(results))}
    with atomic_path(out / "cmif.json") as tmp:
        tmp.write_text(json.dumps(json_safe(results), indent=1))
    paths["json"] = out / "cmif.json"
    paths["plot"] = plot_cmif(results, out / "cmif.png")
    return paths


def cmif_from_cli(args: argparse.Namespace) -> None:
    """`crossmodalnet cmif RUN DATA --out DIR [...]`: measure, write, print a short table."""
    estimators = list(MI_ESTIMATORS) if args.estimator == "both" else [args.estimator]
    results = measure_cmif(args.run, args.data, cases=args.cases, estimators=estimators, pca_dim=args.pca_dim,
                           max_samples=args.max_samples, ablation_run=args.ablation_run, split=args.split,
                           device=args.device, seed=args.seed, pair=tuple(getattr(args, "pair", None) or (0, 1)))
    paths = write_cmif(results, args.out)
    est = estimators[0]
    for key, model in results["models"].items():
        cells = "  ".join(f"{layer['name']} {layer['mi_mean'][est]:.3f}" for layer in model["layers"])
        print(f"{key:16s} I ({est}, nats): {cells}")
    print(f"cmif: {len(results['cases'])} case(s) in {results['seconds']:.0f} s; wrote {paths['csv']}, "
          f"{paths['json'].name}, {paths['plot'].name}")

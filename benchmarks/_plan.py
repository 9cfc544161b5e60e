"""What `benchmarks/compare.py` runs: its settings, and the job specs (with their fingerprints) they mean.

A job spec is the identity of a job: a cached result in WORK/results/ is reused only when it
carries the fingerprint of the very same spec. So nothing here may change a spec of unchanged
settings (key order is irrelevant: `fingerprint` sorts keys); bump PROTOCOL instead when a change
of the harness changes what a job measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _files import fingerprint
from _schedule import split_steps

from crossmodalnet.config import ModelConfig, TrainConfig, to_dict
from crossmodalnet.models.registry import MODEL_NAMES

__all__ = ["PROTOCOL", "CMN", "Settings", "QUICK", "ALIGNMENT_FIELDS", "ablations", "plan"]

# Part of every job's identity: bump it when a change of the harness changes what a job measures,
# so that cached results made the old way are not reused.
PROTOCOL = 2
CMN = "crossmodalnet"


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers (and the work folder they live in)."""

    work: Path = Path("runs/benchmark")
    models: tuple[str, ...] = MODEL_NAMES
    model_size: str = "small"
    cases: int = 30  # split 70/10/20 by the phantom: 21 training, 3 validation, 6 test
    edge: int = 64
    patch: int = 64  # training patch = sliding-window roi; 64³ batch 2 is the reference step
    batch_size: int = 2
    seed: int = 0
    minutes: float = 8.0
    steps: int = 150
    steps_cap_minutes: float = 24.0
    tables: tuple[str, ...] = ("budget", "steps")
    ablations: bool = False
    robustness: bool = False
    dropout: float = 0.3
    misalign: float = 0.5  # TrainConfig.misalign_prob of the misregistration-augmented robustness runs
    train_seed: int | None = None  # seed of the trainings (patches, init); None: `seed` (the data's)
    magnitudes: tuple[float, ...] = (0, 2, 4, 8)
    validations: int = 12  # whole-volume validations per run (one per epoch)
    latency_runs: int = 5
    quick: bool = False


QUICK = dict(work=Path("runs/benchmark-quick"), models=(CMN, "unet"), model_size="tiny", cases=8, edge=32,
             patch=32, minutes=1 / 3, steps=10, steps_cap_minutes=1.0, validations=3, latency_runs=2)


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def _train_spec(s: Settings, key: str, group: str, label: str, model: ModelConfig, budget: bool,
                **train_overrides: Any) -> dict[str, Any]:
    """Spec of one training job; equal budget (schedule sized in the worker) or exactly `s.steps` steps."""
    if budget:
        epochs, ipe, minutes = 1, 1, s.minutes  # epochs and iterations filled in by the worker's probe
    else:
        (epochs, ipe), minutes = split_steps(s.steps, s.validations), s.steps_cap_minutes
    seed = s.seed if s.train_seed is None else s.train_seed
    config = TrainConfig(model=model, seed=seed, epochs=epochs, iterations_per_epoch=ipe, max_minutes=minutes,
                         batch_size=s.batch_size, patch_size=(s.patch,) * 3, val_every=1, warmup_epochs=1,
                         device="cpu", **train_overrides)
    return {"key": key, "kind": "train", "group": group, "label": label, "model": model.name,
            "config": to_dict(config), "budget_s": 60 * s.minutes if budget else None,
            "validations": s.validations, "edge": s.edge, "latency_runs": s.latency_runs,
            "dataset": [s.cases, s.edge, s.seed]}


def _model(s: Settings, name: str, **overrides: Any) -> ModelConfig:
    # img_size: UNETR's absolute position embedding is made for the sliding-window roi.
    return ModelConfig.from_size(name, s.model_size, img_size=s.patch, **overrides)


# The ablations that switch what is meant to handle misregistration; each is also scored under it.
ALIGNMENT_FIELDS = frozenset({"cross_blocks", "cross_first_stage", "deformable", "fine_skips"})


def ablations(s: Settings) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """(key, label, model overrides, train overrides): each flips one default of CrossModalNet."""
    m, t = ModelConfig.from_size(CMN, s.model_size), TrainConfig()
    other = "paper" if m.cross_attention == "standard" else "standard"
    on_off = {True: "on", False: "off"}
    fine = "both" if m.skip_source == "reference" else "reference"
    return [
        (f"ablation-attention-{other}", f"cross attention `{other}`", {"cross_attention": other}, {}),
        (f"ablation-deformable-{on_off[not m.uses_deformable]}", f"deformable {on_off[not m.uses_deformable]}",
         {"deformable": not m.uses_deformable}, {}),
        (f"ablation-cross-blocks-{on_off[not m.cross_blocks]}",
         "no Cross Transformer blocks (fusion in the decoder only)" if m.cross_blocks else "Cross Transformer blocks",
         {"cross_blocks": not m.cross_blocks}, {}),
        (f"ablation-balancing-{on_off[not t.loss_balancing]}", f"loss balancing {on_off[not t.loss_balancing]}",
         {}, {"loss_balancing": not t.loss_balancing}),
        (f"ablation-fine-skips-{fine}", f"fine skips `{fine}`", {"fine_skips": fine}, {}),
        *([("ablation-cross-from-stage-2", "Cross Transformer blocks from stage 2 on (none at the finest tokens)",
            {"cross_first_stage": 1}, {})] if m.cross_blocks and m.first_cross_stage == 0 else []),
        *([("ablation-cross-every-stage", "Cross Transformer blocks after every stage (the paper's)",
            {"cross_first_stage": 0}, {})] if m.cross_blocks and m.first_cross_stage > 0 else []),
    ]


def plan(s: Settings) -> list[dict[str, Any]]:
    """Every job of the requested tables, training jobs before the evaluations that reuse their runs."""
    jobs: list[dict[str, Any]] = []
    need_budget = "budget" in s.tables or s.robustness
    budget_models = s.models if need_budget else ()
    if s.ablations and CMN not in budget_models:
        budget_models = (*budget_models, CMN)  # the ablations' reference row
    for name in budget_models:
        jobs.append(_train_spec(s, f"budget-{name}", "budget", name, _model(s, name), budget=True))
    if "steps" in s.tables:
        for name in s.models:
            jobs.append(_train_spec(s, f"steps-{name}", "steps", name, _model(s, name), budget=False))
    if s.ablations:
        for key, label, mo, to in ablations(s):
            jobs.append(_train_spec(s, key, "ablation", label, _model(s, CMN, **mo), budget=True, **to))
    if s.robustness:
        jobs.append(_train_spec(s, f"dropout-{CMN}", "dropout", f"{CMN}, modality dropout {s.dropout:g}",
                               _model(s, CMN, modality_dropout=s.dropout), budget=True))
        for name in s.models:
            jobs.append({"key": f"misregistration-{name}", "kind": "misregistration", "label": name,
                         "source": f"budget-{name}", "seed": s.seed, "magnitudes": list(s.magnitudes)})
        # Does training with a modality missing at times also make the model lean less on a shifted MR?
        jobs.append({"key": f"misregistration-dropout-{CMN}", "kind": "misregistration",
                     "label": f"{CMN}, modality dropout {s.dropout:g}", "source": f"dropout-{CMN}", "seed": s.seed,
                     "magnitudes": list(s.magnitudes)})
        # What the mechanisms meant for misregistration (the Cross Transformer blocks, the deformable
        # operator, reference-only fine skips) buy under it: the ablations that switch them are scored too.
        for key, label, mo, _ in ablations(s) if s.ablations else []:
            if ALIGNMENT_FIELDS & set(mo):
                jobs.append({"key": f"misregistration-{key}", "kind": "misregistration", "label": f"{CMN}, {label}",
                             "source": key, "seed": s.seed, "magnitudes": list(s.magnitudes)})
        # Training with the MR displaced at random (registration error, `misalign_prob`): CrossModalNet
        # and the early-fusion U-Net, the same budget, then the same test-time misregistration.
        for name in [n for n in (CMN, "unet") if n in s.models]:
            jobs.append(_train_spec(s, f"misalign-{name}", "misalign", f"{name}, MR misalignment {s.misalign:g}",
                                   _model(s, name), budget=True, misalign_prob=s.misalign))
            jobs.append({"key": f"misregistration-misalign-{name}", "kind": "misregistration",
                         "label": f"{name}, trained with MR misalignment {s.misalign:g}",
                         "source": f"misalign-{name}", "seed": s.seed, "magnitudes": list(s.magnitudes)})
        for src in (f"dropout-{CMN}", f"budget-{CMN}"):
            jobs.append({"key": f"missing-{src}", "kind": "missing", "label": src, "source": src})
    by_key = {j["key"]: j for j in jobs}
    for job in jobs:  # a job's identity includes its source's, so retraining invalidates the evaluation
        job["protocol"] = PROTOCOL
        if "source" in job:
            job["source_fingerprint"] = by_key[job["source"]]["fingerprint"]
        job["fingerprint"] = fingerprint(job)
        job["work"] = str(s.work.resolve())
    return jobs



"""JADA: joint adversarial domain adaptation of a trained CrossModalNet to an unlabeled domain.

    adapt("runs/cmn", "data/source", "data/target", "runs/cmn-jada", AdaptConfig())   # -> Path

Starts from a source-trained run folder and trains on labeled source patches and **unlabeled**
target patches (docs/design.md section 4). `AdaptationTask` is one step, run by the
package's one `Engine` (so adaptation gets DDP, mixed precision and bit-identical resume as
training does). On a batch of B source and B target patches (B, 1, *patch) per modality, through
the model in one forward pass (2B samples):

- Dice + CE on the source half (the segmentation must not be forgotten), after a random intensity
  transfer function remapped each source image with probability `source_remap` (`random_transfer`:
  the segmenter must recognise structures by shape, not by the source scanner's contrasts);
- marginal: a domain discriminator on the fused encoder features of stage `feature_stage`
  (read from the model's named `fused_skips[feature_stage]`, (2B, 2C_s, d, h, w)), per token
  ((2B * d * h * w, 2C_s), `token_level`) or global-average-pooled ((2B, 2C_s)), through a gradient
  reversal layer whose coefficient ramps as in DANN, lambda_p = 2 / (1 + exp(-10 p)) - 1;
- conditional: a second discriminator on the CDAN multilinear map of those features and the
  softmax probabilities averaged over the same tokens (or patches) (randomised when 2C_s * 8 >
  `max_outer`), samples optionally weighted by prediction confidence (CDAN+E);
- topology: the persistent-homology penalty of the target probabilities (`train.topoloss`);
- optionally (`entropy_weight` > 0) the mean entropy of the target predictions, fixed weight.

All terms but the entropy are weighted by the adaptive loss balancing of Def. 4 and one backward
pass updates the segmenter and both discriminators (their own Adam): standard single-step DANN
training. Learning rates anneal as in DANN, lr_p = lr / (1 + 10 p)^0.75.

Target labels are never opened: target cases are read image by image (`io.read_image`), and the
target patch sampler gets an all-background dummy label (so it samples uniformly).

Model selection: there are no target labels to select with, so `model.safetensors` holds the
**latest** weights (rewritten at every epoch end, so that an interrupted run can predict too); the
weights with the best source-validation Dice are kept as `model_best_source.safetensors`, a
diagnostic. The adapted run folder is a normal run folder for `predict` (see `crossmodalnet.runs`).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import replace as replace_case
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from crossmodalnet.config import AdaptConfig, TrainConfig, config_differences, load_yaml, parse_terms, replace
from crossmodalnet.data.dataset import Case, load_case, load_dataset
from crossmodalnet.data.preprocess import PreparedCase, Preprocessor
from crossmodalnet.data.spec import DataSpec
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.registry import build_model
from crossmodalnet.runs import RunFolder, load_weights
from crossmodalnet.train import distributed as ddp
from crossmodalnet.train import preflight
from crossmodalnet.train.data import PatchSampler
from crossmodalnet.train.domain import (
    DomainDiscriminator,
    MultilinearMap,
    discriminator_inputs,
    domain_loss,
    entropy_weights,
    grad_reverse,
    grl_coefficient,
    mean_entropy,
    random_transfer,
)
from crossmodalnet.train.engine import LoopSettings, PreparedRun, Task, param_groups
from crossmodalnet.train.losses import AdaptiveLossBalancing, DiceCETerms
from crossmodalnet.train.report import plot_adaptation
from crossmodalnet.train.topoloss import topology_loss
from crossmodalnet.train.trainer import validation_dice

__all__ = ["COLUMNS", "AdaptationTask", "PairedBatches", "prepare_adaptation", "adapt", "adapt_from_cli",
           "forward_with_features"]

_LOSSES = ("dice", "ce", "marginal", "conditional", "topology", "entropy")
COLUMNS: tuple[str, ...] = (
    "loss", "grl_lambda", *(f"loss_{n}" for n in _LOSSES), *(f"weight_{n}" for n in _LOSSES),
    "disc_acc_marginal", "disc_acc_conditional",
)
_TARGET_STREAM = 7_919  # added to the seed of the target patches: another stream than the source's
_REMAP_STREAM = 104_729  # seeds the random intensity transfer functions of a step


@contextlib.contextmanager
def _tap_output(module: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every call of `module` during the block."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _args, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def forward_with_features(model: nn.Module, image: torch.Tensor, present: torch.Tensor | None = None,
                          stage: int = -1) -> tuple[Any, torch.Tensor]:
    """`model(image, present)` and, from the same pass, the fused encoder map of one stage.

    image: (B, M, D, H, W); present: (B, M) bool or None. Returns (logits (B, K, D, H, W) or the
    deep-supervision list, features (B, M C_s, d, h, w) of the padded input): the output of `model.fused_skips[stage]`,
    -1 the map entering the bottleneck, -2, -3, ... the finer ones. A hook reads it, so that the
    forward stays the model's own (and, under DDP, the wrapper's).
    """
    inner = model.module if isinstance(model, DistributedDataParallel) else model  # the hook sits on the layer
    fused = getattr(inner, "fused_skips", None)
    if fused is None:
        raise CrossModalNetError(f"adapt supports CrossModalNet only, not {type(model).__name__}")
    if not -len(fused) <= stage <= -1:
        raise CrossModalNetError(f"feature_stage must be in [-{len(fused)}, -1] for this model, got {stage}")
    with _tap_output(fused[stage]) as seen:
        out = model(image, present)
    return out, seen[0]


class PairedBatches:
    """Source and target batches of a step, the source images remapped (`random_transfer`): a pure
    function of (seed, step), so that background workers can draw them."""

    def __init__(self, source: PatchSampler, target: PatchSampler, seed: int, remap: float) -> None:
        self.source, self.target, self.seed, self.remap = source, target, seed, remap

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        src, tgt = self.source.batch(step), self.target.batch(step)
        if self.remap > 0:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, step, _REMAP_STREAM]))
            src["image"] = torch.cat([random_transfer(src["image"][:, c:c + 1], self.remap, rng)
                                      for c in range(src["image"].shape[1])], dim=1)
        return {"image": torch.cat([src["image"], tgt["image"]]),
                "present": torch.cat([src["present"], tgt["present"]]), "label": src["label"]}


class AdaptationTask(Task):
    """One joint step of segmenter and discriminators (see the module docstring)."""

    columns = COLUMNS
    metric_columns = ("epoch", "step", "lr", *COLUMNS, "source_val_dice", "time_s")
    best_column = "best_source_val_dice"
    select_best = False

    def __init__(self, config: AdaptConfig, run_config: TrainConfig, model: nn.Module, batches: PairedBatches,
                 val_cases: list[PreparedCase], device: torch.device, spec: DataSpec) -> None:
        self.config, self.run_config, self.model, self.batches = config, run_config, model, batches
        self.val_cases, self.device, self.spec = val_cases, device, spec
        mc = run_config.model
        torch.manual_seed(config.seed)  # same discriminators for a given seed
        # Every stream's channels at that stage, concatenated.
        features = mc.modalities * mc.feature_size * 2 ** (len(mc.depths) + config.feature_stage)
        disc: dict[str, nn.Module] = {}
        if "marginal" in config.terms:
            disc["marginal"] = DomainDiscriminator(features, config.hidden, config.dropout)
        if "conditional" in config.terms:
            disc["map"] = MultilinearMap(features, mc.out_channels, config.max_outer, config.random_dim, config.seed)
            disc["conditional"] = DomainDiscriminator(disc["map"].out_features, config.hidden, config.dropout)
        self.extra = nn.ModuleDict(disc).to(device)
        opt_cls = torch.optim.Adam if run_config.optimizer == "adam" else torch.optim.AdamW
        # Topology alone has no discriminator; a stand-in parameter keeps one code path.
        disc_params = list(self.extra.parameters()) or [nn.Parameter(torch.zeros(1))]
        self.optimizers = [opt_cls(param_groups([model], run_config.weight_decay), lr=config.lr),
                           torch.optim.Adam(disc_params, lr=config.discriminator_lr)]
        self.loss_fn = DiceCETerms()
        self.balancer = AdaptiveLossBalancing(("dice", "ce", *config.terms), config.balancing_alpha)
        self.total_steps = config.epochs * config.iterations_per_epoch
        self.best_source = -math.inf

    def lr_factor(self, step: int, total_steps: int) -> float:
        """DANN's annealing, 1 / (1 + 10 p)^0.75 with p the share of steps done."""
        return (1.0 + 10.0 * step / max(1, total_steps)) ** -0.75

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        image, label = batch["image"], batch["label"]
        b = label.shape[0]
        out, features = forward_with_features(model, image, batch["present"], cfg.feature_stage)
        outs = out if isinstance(out, list | tuple) else [out]
        losses = self.loss_fn([o[:b] for o in outs], label)
        probs = torch.softmax(outs[0].float(), dim=1)  # 2B, K, *patch
        domain = torch.cat([torch.ones(b), torch.zeros(image.shape[0] - b)]).to(image.device)
        f, g, dom = discriminator_inputs(features.float(), probs.detach(), domain, cfg.token_level)
        lam = grl_coefficient(min(1.0, step / max(1, self.total_steps)), cfg.grl_gamma, cfg.grl_scale)
        acc = {"marginal": math.nan, "conditional": math.nan}
        if "marginal" in cfg.terms:
            logits = self.extra["marginal"](grad_reverse(f, lam))
            losses["marginal"], acc["marginal"] = domain_loss(logits, dom)
        if "conditional" in cfg.terms:
            # g detached, as in the CDAN reference code: the map conditions, it is not a path to the classifier.
            mapped = self.extra["map"](f, g)
            weights = entropy_weights(g if cfg.token_level else probs, dom) if cfg.entropy_conditioning else None
            logits = self.extra["conditional"](grad_reverse(mapped, lam))
            losses["conditional"], acc["conditional"] = domain_loss(logits, dom, weights)
        if "topology" in cfg.terms:
            losses["topology"] = topology_loss(probs[b:], cfg.topology_size, cfg.topology_threshold,
                                               pool=cfg.topology_pool, bars=cfg.topology_bars,
                                               encloses=dict(self.spec.enclosures))
        total, used = self.balancer(losses, update=False)
        if cfg.entropy_weight > 0:
            losses["entropy"] = mean_entropy(probs[b:])
            total = total + cfg.entropy_weight * losses["entropy"]
            used["entropy"] = cfg.entropy_weight
        logs: dict[str, Any] = {"loss": total.detach(), "grl_lambda": lam,
                                "disc_acc_marginal": acc["marginal"], "disc_acc_conditional": acc["conditional"]}
        for n in _LOSSES:
            logs[f"loss_{n}"] = losses[n].detach() if n in losses else math.nan
            logs[f"weight_{n}"] = float(used[n]) if n in used else math.nan
        return total, logs

    def after_step(self, logs: dict[str, float]) -> None:
        self.balancer.update({n: logs[f"loss_{n}"] for n in self.balancer.names})

    def validate(self, dist: ddp.DistInfo) -> dict[str, float] | None:
        if not self.val_cases:
            return None
        scores = validation_dice(self.model, self.val_cases, self.run_config, self.device, self.spec, dist)
        dice = scores["val_region_mean"] if self.spec.regions else scores["val_dice_mean"]
        return {"source_val_dice": dice, "score": dice}

    def on_validation(self, scores: dict[str, float], run: RunFolder, epoch: int, step: int) -> None:
        if scores["score"] > self.best_source:
            self.best_source = scores["score"]
            run.save_weights(self.model, self.run_config.model, name=RunFolder.BEST_SOURCE, epoch=epoch, step=step,
                             source_val_dice=self.best_source)

    def figure(self, history: list[dict[str, Any]], steps: list[dict[str, Any]]) -> Any:
        return plot_adaptation(history, steps, self.config.terms)

    def summary_line(self, row: dict[str, Any], epochs: int) -> str:
        return (f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.4f}  source val Dice "
                f"{row['source_val_dice']:.4f}  lambda {row['grl_lambda']:.3f}")

    def state_dict(self) -> dict[str, Any]:
        return {"balancing": self.balancer.state_dict(), "best_source": self.best_source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.balancer.load_state_dict(state["balancing"])
        self.best_source = float(state["best_source"])


def _open_source_run(run: RunFolder, out: RunFolder) -> tuple[TrainConfig, Preprocessor]:
    """The source run's TrainConfig and preprocessing; refuses what adaptation cannot start from."""
    if not run.path.is_dir():
        raise CrossModalNetError(f"{run.path}: source run folder not found")
    if out.path.resolve() == run.path.resolve():
        raise CrossModalNetError(f"{out.path}: --out must be a new folder, not the source run")
    config = run.read_config()
    if not run.has_weights():
        raise CrossModalNetError(f"{run.weights_path}: not found; the source run has not finished (or validated "
                                 "once); train it first")
    if config.model.name != "crossmodalnet":
        raise CrossModalNetError(f"{run.config_path}: model {config.model.name!r}; adapt supports crossmodalnet "
                                 "only (it aligns CrossModalNet's fused encoder features)")
    return config, run.read_preprocess()


def _check_resume(out: RunFolder, config: AdaptConfig, inputs: dict[str, str]) -> None:
    saved_inputs, saved = out.read_adapt()
    where = out / RunFolder.ADAPT_CONFIG
    for key, value in inputs.items():
        if saved_inputs.get(key) != value:
            raise CrossModalNetError(f"{where}: --resume refused, {key} was {saved_inputs.get(key)}, now {value}")
    diffs = config_differences(saved, config)
    if diffs:
        raise CrossModalNetError(f"{where}: --resume refused, other settings ({'; '.join(diffs)})")


def _prepare_target(root: Path, preprocessor: Preprocessor, spec: DataSpec) -> list[PreparedCase]:
    """Target training + validation cases in network space, images only, with a dummy all-zero label.

    Label files are never opened (nor required to exist): the images are read one by one.
    """
    dataset = load_dataset(root, check_files=False)  # checking files would stat the label paths too
    cases = [*dataset["training"], *dataset["validation"]]
    json_path = root / "dataset.json"
    if dataset.spec.channels != spec.channels:
        raise CrossModalNetError(f"{json_path}: channels {list(dataset.spec.channels)} are not the source run's "
                                 f"{list(spec.channels)}")
    if not cases:
        raise CrossModalNetError(f"{json_path}: lists no training or validation images to adapt to "
                                 "(the test split is kept for evaluation)")
    prepared = []
    for c in cases:
        for ref in c.images:
            if ref is not None and not ref.path.is_file():
                raise CrossModalNetError(f"{ref.path}: file not found (target case {c.id!r})")
        d = load_case(replace_case(c, label=None), spec, with_label=False)
        case = preprocessor.prepare(d["images"], d["geometry"], None, c.id)
        # A dummy label, so that PatchSampler can cache the case; all background: uniform patch centres.
        prepared.append(replace_case(case, label=np.zeros(case.shape, dtype=np.uint8)))
    return prepared


def _prepare_labeled(case: Case, preprocessor: Preprocessor, spec: DataSpec) -> PreparedCase:
    d = load_case(case, spec)
    return preprocessor.prepare(d["images"], d["geometry"], d["label"], case.id)


def prepare_adaptation(source_run: str | os.PathLike, source_data: str | os.PathLike,
                       target_data: str | os.PathLike, out_dir: str | os.PathLike, config: AdaptConfig,
                       resume: bool = False, dist: ddp.DistInfo | None = None) -> PreparedRun:
    """Check every input and load every case, then create `out_dir` (nothing is written before)."""
    dist = dist or ddp.DistInfo(device=ddp.resolve_device(config.device))
    source, out = RunFolder(source_run), RunFolder(out_dir)
    run_config, preprocessor = ddp.main_first(lambda: _open_source_run(source, out), dist)
    spec = source.read_spec()
    if spec.train_regions:  # the discriminators condition on softmax class probabilities
        raise CrossModalNetError(f"{source.spec_path}: the run was trained on regions (sigmoids); adapt needs "
                                 "a run trained on classes (softmax)")
    if preflight.dataset_spec(source_data) != spec:
        raise CrossModalNetError(f"{Path(source_data) / 'dataset.json'}: its channels, labels or regions are not "
                                 f"those run {source.path} was trained on")
    stages = len(run_config.model.depths)
    if not -stages <= config.feature_stage <= -1:
        raise CrossModalNetError(f"adapt config: feature_stage must be in [-{stages}, -1] for the model of "
                                 f"{source.path}, got {config.feature_stage}")
    inputs = {"source_run": str(source.path.resolve()), "source_data": str(Path(source_data).resolve()),
              "target_data": str(Path(target_data).resolve())}
    ddp.main_first(lambda: _check_resume(out, config, inputs) if resume else out.open_new("adaptation"), dist)
    batch = config.batch_size or run_config.batch_size
    preflight.check_runnable(replace(run_config, batch_size=batch), dist.world_size)
    train_cases, val_cases = ddp.main_first(lambda: preflight.dataset_splits(source_data, run_config), dist)
    source_cases = [_prepare_labeled(c, preprocessor, spec) for c in train_cases]
    val_prepared = [_prepare_labeled(c, preprocessor, spec) for c in val_cases[dist.rank::dist.world_size]]
    target_cases = _prepare_target(Path(target_data), preprocessor, spec)
    if dist.is_main:  # every check passed: now the folder may be written
        out.create()
        out.copy_definition_from(source)  # what `predict` needs besides weights
        if not (out / RunFolder.ADAPT_CONFIG).is_file():
            out.write_adapt(inputs, config)
    ddp.barrier(dist)
    spacing, per_rank = preprocessor.target_spacing, batch // dist.world_size
    batches = PairedBatches(
        PatchSampler(source_cases, replace(run_config, seed=config.seed), rank=dist.rank, batch_size=per_rank,
                     spacing=spacing),
        PatchSampler(target_cases, replace(run_config, seed=config.seed + _TARGET_STREAM, foreground_ratio=0.0),
                     rank=dist.rank, batch_size=per_rank, spacing=spacing),
        config.seed, config.source_remap)
    model = build_model(run_config.model.name, run_config.model)
    state = out.load_checkpoint(model) if resume else None
    if state is None:
        load_weights(model, source.weights_path)
    if dist.distributed:  # every rank needs the step count; DDP broadcasts rank 0's weights
        state = ddp.main_first(lambda: state, dist)
    model.to(dist.device)
    task = AdaptationTask(config, run_config, model, batches, val_prepared, dist.device, spec)
    settings = LoopSettings(
        total_steps=task.total_steps, iterations_per_epoch=config.iterations_per_epoch, seed=config.seed,
        max_minutes=config.max_minutes, grad_clip=run_config.grad_clip, precision=run_config.precision,
        num_workers=config.num_workers, val_every=config.val_every,
        desc=f"adapt ({'+'.join(config.terms) or 'source fine-tuning only'})")
    return PreparedRun(task, settings, out, dist, state, run_config.model)


def adapt(source_run: str | os.PathLike, source_data: str | os.PathLike, target_data: str | os.PathLike,
          out_dir: str | os.PathLike, config: AdaptConfig | None = None, resume: bool = False) -> Path:
    """Adapt the model of `source_run` to the images of `target_data` into `out_dir` (see the module
    docstring); DDP under torchrun."""
    config = config or AdaptConfig()
    dist = ddp.init_distributed(config.device)
    try:
        prepared = prepare_adaptation(source_run, source_data, target_data, out_dir, config, resume, dist)
        engine, task, out = prepared.fit(), prepared.task, prepared.run
        if dist.is_main:
            best = task.best_source if math.isfinite(task.best_source) else None
            out.write_summary(RunFolder.ADAPT_SUMMARY, {
                "status": "finished" if engine.finished else "stopped", "step": engine.step,
                "total_steps": engine.settings.total_steps, "elapsed_s": engine.elapsed,
                "terms": list(config.terms), "best_source_val_dice": best})
            status = "finished" if engine.finished else "stopped at the time budget"
            print(f"adaptation {status}: step {engine.step}/{engine.settings.total_steps}; final weights "
                  f"{out.weights_path}")
        return out.path
    finally:
        ddp.cleanup(dist)


def adapt_from_cli(args: argparse.Namespace) -> None:
    """`crossmodalnet adapt RUN --source DATA --target DATA --out RUN2 [...]`: flags over --config over defaults."""
    out = RunFolder(args.out)
    if args.config is not None:
        config = load_yaml(AdaptConfig, args.config)
    elif args.resume and (out / RunFolder.ADAPT_CONFIG).is_file():
        config = out.read_adapt()[1]
    else:
        config = AdaptConfig()
    flags: dict[str, Any] = {key: getattr(args, key) for key in ("epochs", "max_minutes", "lr", "seed", "device")
                             if getattr(args, key, None) is not None}
    if args.terms is not None:
        try:
            flags["terms"] = parse_terms(args.terms)
        except ValueError as exc:
            raise CrossModalNetError(f"--terms: {exc}") from None
    adapt(args.run, args.source, args.target, args.out, replace(config, **flags) if flags else config,
          resume=args.resume)

"""JADA: joint adversarial domain adaptation of a trained CrossModalNet to an unlabeled domain.

    adapt("runs/cmn", "data/source", "data/target", "runs/cmn-jada", AdaptConfig())   # -> Path

Starts from a source-trained run folder and trains on labeled source patches and **unlabeled**
target patches (DESIGN.md section 5). One optimizer step, on a batch of B source and B target
patches (B, 1, *patch) per modality, run through the model in one forward pass (2B samples):

- Dice + CE on the source half (the segmentation must not be forgotten), after a random intensity
  transfer function remapped each source image with probability `source_remap` (`random_transfer`:
  the segmenter must recognise structures by shape, not by the source scanner's contrasts);
- marginal: a domain discriminator on the fused encoder features of stage `feature_stage`
  (skips[feature_stage] of `encode`, (2B, 2C_s, d, h, w)), per token ((2B * d * h * w, 2C_s),
  `token_level`) or global-average-pooled ((2B, 2C_s)), through a gradient reversal layer whose
  coefficient ramps as in DANN, lambda_p = 2 / (1 + exp(-10 p)) - 1;
- conditional: a second discriminator on the CDAN multilinear map of those features and the
  softmax probabilities averaged over the same tokens (or patches) (randomised when 2C_s * 8 >
  `max_outer`), samples optionally weighted by prediction confidence (CDAN+E);
- topology: the persistent-homology penalty of the target probabilities (`train.topoloss`);
- optionally (`entropy_weight` > 0) the mean entropy of the target predictions, fixed weight.

All terms but the entropy are weighted by the adaptive loss balancing of Def. 4
(`AdaptiveLossBalancing`) and one backward pass updates the segmenter (Adam/AdamW as in the source
run) and both discriminators (their own Adam): standard single-step DANN training. Learning rates
anneal as in DANN, lr_p = lr / (1 + 10 p)^0.75.

Target labels are never opened: target cases are read image by image (`io.read_image`), and the
target patch sampler gets an all-background dummy label (so it samples uniformly).

Model selection: there are no target labels to select with, so `model.safetensors` holds the
**final** weights (rewritten at every epoch end, so that an interrupted run can predict too).
The weights with the best source-validation Dice are kept in `model_best_source.safetensors`
as a diagnostic, not as the model. The run folder is a normal run folder for `predict`:

    RUN2/config.yaml, preprocess.json    copied from the source run
    RUN2/model.safetensors               final adapted weights
    RUN2/adapt.yaml                      AdaptConfig and the three input folders
    RUN2/last/                           resume state (segmenter, discriminators, optimizers, logs)
    RUN2/steps.csv, metrics.csv, curves.png
    RUN2/adapt.json                      written at the end: finished or stopped, steps, time
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from crossmodalnet.config import TrainConfig, from_dict, load_run_config, load_yaml, read_yaml, to_dict
from crossmodalnet.data.dataset import Case, load_case, load_dataset
from crossmodalnet.data.io import atomic_path, check_same_grid, read_image
from crossmodalnet.data.preprocess import PreparedCase, Preprocessor
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.train import checkpoint as ckpt
from crossmodalnet.train import preflight
from crossmodalnet.train.data import PatchSampler, step_seed
from crossmodalnet.train.domain import (
    DomainDiscriminator,
    MultilinearMap,
    domain_loss,
    entropy_weights,
    grad_reverse,
    grl_coefficient,
    voxel_entropy,
)
from crossmodalnet.train.losses import AdaptiveLossBalancing, DiceCETerms
from crossmodalnet.train.report import write_csv
from crossmodalnet.train.topoloss import BARS, POOLS, topology_loss
from crossmodalnet.train.trainer import validation_dice

__all__ = [
    "TERMS", "AdaptConfig", "Adapter", "adapt", "adapt_from_cli", "forward_with_features", "parse_terms",
    "random_transfer",
]

TERMS: tuple[str, ...] = ("marginal", "conditional", "topology")
ADAPT_CONFIG = "adapt.yaml"
SUMMARY = "adapt.json"
BEST_SOURCE = "model_best_source.safetensors"
_LOSSES = ("dice", "ce", *TERMS, "entropy")
STEP_COLUMNS: tuple[str, ...] = (
    "step", "epoch", "lr", "grl_lambda", "loss", *(f"loss_{n}" for n in _LOSSES),
    *(f"weight_{n}" for n in _LOSSES), "disc_acc_marginal", "disc_acc_conditional",
)
METRIC_COLUMNS: tuple[str, ...] = ("epoch", *STEP_COLUMNS[2:], "source_val_dice", "time_s")
_TARGET_STREAM = 7_919  # added to the seed of the target patches: another stream than the source's
_REMAP_STREAM = 104_729  # seeds the random intensity transfer functions of a step


@dataclass
class AdaptConfig:
    """Settings of one adaptation run (saved as RUN2/adapt.yaml). Data and model come from the source run."""

    terms: tuple[str, ...] = TERMS
    epochs: int = 10
    iterations_per_epoch: int = 20
    max_minutes: float | None = None  # stop (and save) after this wall time
    batch_size: int | None = None  # patches per domain and step; None: the source run's batch size
    lr: float = 5e-4  # segmenter, annealed; lower than training: the source model is a good start
    discriminator_lr: float = 1e-3
    grl_gamma: float = 10.0  # steepness of the lambda ramp
    grl_scale: float = 1.0  # lambda's final value
    hidden: int = 256  # discriminator width
    dropout: float = 0.5
    max_outer: int = 4096  # largest exact CDAN outer product; beyond it the randomised map
    random_dim: int = 1024
    entropy_conditioning: bool = True
    topology_size: int = 24  # probabilities pooled to at most this many voxels per axis
    topology_threshold: float = 0.5  # a structure enters the penalty when its pooled max reaches this
    topology_pool: str = "split"  # "split" | "avg" | "max": how the probabilities are pooled (topoloss)
    topology_bars: str = "decision"  # "decision" | "all": which persistence bars, which end moves (topoloss)
    balancing_alpha: float = 1.0  # Def. 4 temperature over all terms
    feature_stage: int = -2  # encoder stage whose fused map is aligned: -1 the bottleneck's input, -2 the next finer
    token_level: bool = True  # discriminators judge every position of that map, not its global average
    entropy_weight: float = 0.0  # fixed weight of the mean target prediction entropy (ADVENT), outside Def. 4
    source_remap: float = 0.5  # per source patch and channel: probability of a random intensity transfer function
    val_every: int = 5  # epochs between source-validation Dice (diagnostic); 0: never
    seed: int = 0
    device: str = "auto"


def parse_terms(text: str | Sequence[str]) -> tuple[str, ...]:
    """'marginal,conditional' (or a sequence) -> ('marginal', 'conditional'), checked.

    'none' (or an empty sequence) -> (): no adaptation term, the ablation that fine-tunes on the
    source alone with the adaptation's recipe (schedule, source intensity remapping).
    """
    if isinstance(text, str) and text.strip() == "none" or not isinstance(text, str) and len(text) == 0:
        return ()
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in items if t not in TERMS]
    if unknown:
        raise CrossModalNetError(f"--terms: unknown term {unknown[0]!r}; choose from {', '.join(TERMS)} or none")
    if not items:
        raise CrossModalNetError(f"--terms: give at least one of {', '.join(TERMS)}, or none")
    return tuple(t for t in TERMS if t in items)  # canonical order: logs and checkpoints line up


@contextmanager
def _tap(module: nn.Module, index: int = 0) -> Iterator[list[torch.Tensor]]:
    """Collect the positional input `index` of every call of `module` during the block."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[index]))
    try:
        yield seen
    finally:
        handle.remove()


def forward_with_features(model: nn.Module, ct: torch.Tensor, mr: torch.Tensor,
                          stage: int = -1) -> tuple[Any, torch.Tensor]:
    """`model(ct, mr)` and, from the same pass, the fused encoder features of one stage.

    ct, mr: (B, 1, D, H, W). Returns (logits (B, 8, D, H, W) or the deep-supervision list,
    features (B, 2C_s, d, h, w) = `encode(...)[1][stage]` of the padded input). stage -1 is the
    map entering the bottleneck; -2, -3, ... the finer skips, read where the decoder takes them in
    (`ups[-stage - 2]`). Hooks read them, so that the forward stays the model's own.
    """
    if not hasattr(model, "bottleneck") or not hasattr(model, "encode"):
        raise CrossModalNetError(f"adapt supports CrossModalNet only, not {type(model).__name__}")
    stages = len(model.config.depths)
    if not -stages <= stage <= -1:
        raise CrossModalNetError(f"feature_stage must be in [-{stages}, -1] for this model, got {stage}")
    with _tap(model.bottleneck) if stage == -1 else _tap(model.ups[-stage - 2], 1) as seen:
        out = model(ct, mr)
    return out, seen[0]


class Adapter:
    """One adaptation run. `Adapter(...).fit()` adapts and returns the run folder.

    Construction checks every input (source run, both dataset folders, --out), prepares the data
    with the source run's preprocessing and restores `last/` when resuming; nothing trains before `fit`.
    """

    def __init__(self, source_run: str | os.PathLike, source_data: str | os.PathLike,
                 target_data: str | os.PathLike, out_dir: str | os.PathLike, config: AdaptConfig,
                 resume: bool = False) -> None:
        config = dataclasses.replace(config, terms=parse_terms(config.terms))
        self.config, self.out = config, Path(out_dir)
        _check_config(config)
        self.run_config, self.preprocessor = _open_source_run(Path(source_run), self.out)
        stages = len(self.run_config.model.depths)
        if not -stages <= config.feature_stage <= -1:
            raise CrossModalNetError(f"adapt config: feature_stage must be in [-{stages}, -1] for the model of "
                                     f"{source_run}, got {config.feature_stage}")
        inputs = {"source_run": str(Path(source_run).resolve()), "source_data": str(Path(source_data).resolve()),
                  "target_data": str(Path(target_data).resolve())}
        state = _open_out(self.out, config, inputs, resume)
        from crossmodalnet.train.distributed import resolve_device

        self.device = resolve_device(config.device)
        rc = self.run_config
        train_cases, val_cases = preflight.dataset_splits(source_data, rc)
        source = [self._prepare_labeled(c) for c in train_cases]
        self.val_cases: list[PreparedCase] = [self._prepare_labeled(c) for c in val_cases]
        target = _prepare_target(Path(target_data), self.preprocessor)
        batch = config.batch_size or rc.batch_size
        spacing = self.preprocessor.target_spacing
        self.source = PatchSampler(source, dataclasses.replace(rc, seed=config.seed), batch_size=batch,
                                   spacing=spacing)
        self.target = PatchSampler(target, dataclasses.replace(rc, seed=config.seed + _TARGET_STREAM,
                                                               foreground_ratio=0.0), batch_size=batch, spacing=spacing)
        self.out.mkdir(parents=True, exist_ok=True)
        for name in (ckpt.CONFIG, ckpt.PREPROCESS):  # what `predict` needs, from the source run
            if not (self.out / name).is_file():
                shutil.copyfile(Path(source_run) / name, self.out / name)
        if not (self.out / ADAPT_CONFIG).is_file():
            with atomic_path(self.out / ADAPT_CONFIG) as tmp:
                tmp.write_text(yaml.safe_dump({**inputs, "adapt": to_dict(config)}, sort_keys=False))
        self._build(Path(source_run), state)

    # --- set-up ------------------------------------------------------------------------------
    def _prepare_labeled(self, case: Case) -> PreparedCase:
        """A source case (images and label) in network space, by the source run's preprocessing."""
        d = load_case(case)
        return self.preprocessor.prepare(d["ct"], d["mr"], d["geometry"], d["label"], case.id)

    def _build(self, source_run: Path, state: dict[str, Any] | None) -> None:
        from crossmodalnet.models.registry import build_model

        cfg, mc = self.config, self.run_config.model
        self.model = build_model(mc.name, mc)
        weights = self.out / ckpt.LAST / "model.safetensors" if state is not None else source_run / ckpt.BEST
        ckpt.load_weights(self.model, weights)
        self.model.to(self.device)
        torch.manual_seed(cfg.seed)  # same discriminators for a given seed
        features = 2 * mc.feature_size * 2 ** (len(mc.depths) + cfg.feature_stage)  # both streams at that stage
        disc: dict[str, nn.Module] = {}
        if "marginal" in cfg.terms:
            disc["marginal"] = DomainDiscriminator(features, cfg.hidden, cfg.dropout)
        if "conditional" in cfg.terms:
            disc["map"] = MultilinearMap(features, mc.out_channels, cfg.max_outer, cfg.random_dim, cfg.seed)
            disc["conditional"] = DomainDiscriminator(disc["map"].out_features, cfg.hidden, cfg.dropout)
        self.disc = nn.ModuleDict(disc).to(self.device)
        opt_cls = torch.optim.Adam if self.run_config.optimizer == "adam" else torch.optim.AdamW
        self.optimizer = opt_cls(self.model.parameters(), lr=cfg.lr, weight_decay=self.run_config.weight_decay)
        params = list(self.disc.parameters())
        # Topology alone has no discriminator; a stand-in parameter keeps one code path.
        self.disc_optimizer = torch.optim.Adam(params or [nn.Parameter(torch.zeros(1))], lr=cfg.discriminator_lr)
        self.total_steps = cfg.epochs * cfg.iterations_per_epoch
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, self._lr_factor)
                           for o in (self.optimizer, self.disc_optimizer)]
        self.loss_fn = DiceCETerms()
        self.balancer = AdaptiveLossBalancing(("dice", "ce", *cfg.terms), cfg.balancing_alpha)
        self.step, self.elapsed, self.best_source = 0, 0.0, -math.inf
        self.history: list[dict[str, Any]] = []
        self.step_log: list[list[float]] = []
        if state is not None:
            self._restore(state)

    def _lr_factor(self, step: int) -> float:
        """DANN's annealing, 1 / (1 + 10 p)^0.75 with p the share of steps done."""
        return (1.0 + 10.0 * step / max(1, self.total_steps)) ** -0.75

    def _state(self) -> dict[str, Any]:
        # No RNG state: patches and every random draw of a step are seeded from (seed, step).
        return {
            "format": 1, "step": self.step, "epoch": self.step // self.config.iterations_per_epoch,
            "elapsed_s": self.elapsed, "best_source": self.best_source, "history": self.history,
            "step_log": torch.tensor(self.step_log, dtype=torch.float64).reshape(-1, len(STEP_COLUMNS)),
            "optimizer": self.optimizer.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict(),
            "schedulers": [s.state_dict() for s in self.schedulers], "discriminators": self.disc.state_dict(),
            "balancing": self.balancer.state_dict(),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.step, self.elapsed = int(state["step"]), float(state["elapsed_s"])
        self.best_source, self.history = float(state["best_source"]), list(state["history"])
        self.step_log = state["step_log"].tolist()
        self.optimizer.load_state_dict(state["optimizer"])
        self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        for s, saved in zip(self.schedulers, state["schedulers"], strict=True):
            s.load_state_dict(saved)
        self.disc.load_state_dict(state["discriminators"])
        self.balancer.load_state_dict(state["balancing"])

    # --- adaptation --------------------------------------------------------------------------
    def fit(self) -> Path:
        """Adapt until `epochs` (or `max_minutes`), checkpointing every epoch; returns the run folder."""
        cfg = self.config
        self._start, self._elapsed0 = time.monotonic(), self.elapsed
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   desc=f"adapt ({'+'.join(cfg.terms) or 'source fine-tuning only'})")
        stop = False
        try:
            while self.step < self.total_steps and not stop:
                stop = self._adapt_step()
                bar.set_postfix(loss=f"{self.step_log[-1][4]:.4f}", refresh=False)
                bar.update(1)
                if self.step % cfg.iterations_per_epoch == 0 or stop or self.step >= self.total_steps:
                    self._end_epoch(bar)
        finally:
            bar.close()
        status = "finished" if self.step >= self.total_steps else "stopped at the time budget"
        summary = {"status": "finished" if self.step >= self.total_steps else "stopped", "step": self.step,
                   "total_steps": self.total_steps, "elapsed_s": self.elapsed, "terms": list(cfg.terms),
                   "best_source_val_dice": self.best_source if math.isfinite(self.best_source) else None}
        with atomic_path(self.out / SUMMARY) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
        print(f"adaptation {status}: step {self.step}/{self.total_steps}; final weights {self.out / ckpt.BEST}")
        return self.out

    def _adapt_step(self) -> bool:
        """One joint step of segmenter and discriminators; True when the time budget says stop."""
        cfg, rc = self.config, self.run_config
        src, tgt = self.source.batch(self.step), self.target.batch(self.step)
        if cfg.source_remap > 0:
            rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, self.step, _REMAP_STREAM]))
            src["ct"], src["mr"] = (random_transfer(src[m], cfg.source_remap, rng) for m in ("ct", "mr"))
        torch.manual_seed(step_seed(cfg.seed, 0, self.step))  # dropout, modality dropout
        self.model.train()
        self.disc.train()
        b = src["ct"].shape[0]
        ct = torch.cat([src["ct"], tgt["ct"]]).to(self.device)
        mr = torch.cat([src["mr"], tgt["mr"]]).to(self.device)
        out, features = forward_with_features(self.model, ct, mr, cfg.feature_stage)
        outs = out if isinstance(out, list | tuple) else [out]
        losses = self.loss_fn([o[:b] for o in outs], src["label"].to(self.device))
        probs = torch.softmax(outs[0].float(), dim=1)  # 2B, K, *patch
        domain = torch.cat([torch.ones(b), torch.zeros(ct.shape[0] - b)]).to(self.device)
        f, g, dom = _discriminator_inputs(features.float(), probs.detach(), domain, cfg.token_level)
        lam = grl_coefficient(min(1.0, self.step / max(1, self.total_steps)), cfg.grl_gamma, cfg.grl_scale)
        acc = {"marginal": math.nan, "conditional": math.nan}
        if "marginal" in cfg.terms:
            logits = self.disc["marginal"](grad_reverse(f, lam))
            losses["marginal"], acc["marginal"] = domain_loss(logits, dom)
        if "conditional" in cfg.terms:
            # g detached, as in the CDAN reference code: the map conditions, it is not a path to the classifier.
            mapped = self.disc["map"](f, g)
            weights = entropy_weights(g if cfg.token_level else probs, dom) if cfg.entropy_conditioning else None
            logits = self.disc["conditional"](grad_reverse(mapped, lam))
            losses["conditional"], acc["conditional"] = domain_loss(logits, dom, weights)
        if "topology" in cfg.terms:
            losses["topology"] = topology_loss(probs[b:], cfg.topology_size, cfg.topology_threshold,
                                               pool=cfg.topology_pool, bars=cfg.topology_bars)
        total, weights_used = self.balancer(losses, update=False)
        if cfg.entropy_weight > 0:
            losses["entropy"] = _mean_entropy(probs[b:])
            total = total + cfg.entropy_weight * losses["entropy"]
            weights_used["entropy"] = cfg.entropy_weight
        if not torch.isfinite(total):
            last = ckpt.find_last(self.out)
            raise CrossModalNetError(f"{self.out}: adaptation stopped at step {self.step}: loss is {float(total)} "
                                     f"({'last good checkpoint ' + str(last) if last else 'no checkpoint yet'}); "
                                     "lower --lr or check the data")
        self.optimizer.zero_grad(set_to_none=True)
        self.disc_optimizer.zero_grad(set_to_none=True)
        total.backward()
        if rc.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), rc.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.disc_optimizer.step()
        for s in self.schedulers:
            s.step()
        values = {k: float(v.detach()) for k, v in losses.items()}
        self.balancer.update({n: values[n] for n in self.balancer.names})
        row = [self.step, self.step // cfg.iterations_per_epoch + 1, lr, lam, float(total.detach()),
               *(values.get(n, math.nan) for n in _LOSSES), *(weights_used.get(n, math.nan) for n in _LOSSES),
               acc["marginal"], acc["conditional"]]
        self.step_log.append(row)
        self.step += 1
        self.elapsed = self._elapsed0 + time.monotonic() - self._start
        return cfg.max_minutes is not None and time.monotonic() - self._start > 60 * cfg.max_minutes

    def _end_epoch(self, bar: tqdm) -> None:
        """Average the epoch's steps, validate on source when due, save weights, last/ and logs."""
        cfg = self.config
        epoch = math.ceil(self.step / cfg.iterations_per_epoch)
        rows = [r for r in self.step_log if int(r[1]) == epoch]
        row: dict[str, Any] = {"epoch": epoch, "step": self.step,
                               **{c: float(np.mean([r[i] for r in rows])) for i, c in enumerate(STEP_COLUMNS)
                                  if i >= 2}}
        due = cfg.val_every > 0 and (epoch % cfg.val_every == 0 or self.step >= self.total_steps)
        if due and self.val_cases:
            row["source_val_dice"] = validation_dice(self.model, self.val_cases, self.run_config, self.device)["mean"]
            if row["source_val_dice"] > self.best_source:
                self.best_source = row["source_val_dice"]
                ckpt.save_weights(self.model, self.out / BEST_SOURCE, self.run_config.model, epoch=epoch,
                                  step=self.step, source_val_dice=self.best_source)
            bar.write(f"epoch {epoch}/{cfg.epochs}  loss {row['loss']:.4f}  source val Dice "
                      f"{row['source_val_dice']:.4f}  lambda {row['grl_lambda']:.3f}")
        row["time_s"] = self.elapsed
        self.history = [r for r in self.history if r["epoch"] != epoch] + [row]
        ckpt.save_weights(self.model, self.out / ckpt.BEST, self.run_config.model, epoch=epoch, step=self.step,
                          selection="final weights (no target labels to select with)")
        ckpt.save_last(self.out, self.model, self._state(), self.run_config.model)
        steps = [dict(zip(STEP_COLUMNS, r, strict=True)) for r in self.step_log]
        write_csv(self.out / ckpt.STEPS, STEP_COLUMNS, steps)
        write_csv(self.out / ckpt.METRICS, METRIC_COLUMNS, self.history)
        plot_adaptation(self.out / ckpt.CURVES, self.history, steps, cfg.terms)


def random_transfer(images: torch.Tensor, prob: float, rng: np.random.Generator, knots: int = 6) -> torch.Tensor:
    """Random intensity transfer functions: images (B, 1, *patch) -> same shape, new tensor.

    Each image is remapped, with probability `prob`, through a random piecewise-linear curve over
    its own intensity range: `knots` evenly spaced inputs mapped to uniform random outputs in that
    range, so the curve is generally not monotone and tissue contrasts are reshuffled (domain
    randomisation, as Bezier-curve remapping or random-convolution augmentation). The result keeps
    the image's mean and standard deviation. Edges and shapes are untouched: a model trained on
    such sources must recognise structures by shape and context more than by their brightness.
    """
    out = images.clone()
    for i in range(images.shape[0]):
        if rng.random() >= prob:
            continue
        x = images[i]
        lo, hi = float(x.min()), float(x.max())
        if hi - lo < 1e-6:
            continue
        xs = torch.linspace(lo, hi, knots, dtype=x.dtype)
        ys = torch.as_tensor(rng.uniform(lo, hi, knots), dtype=x.dtype)
        j = torch.bucketize(x.clamp(lo, hi), xs[1:-1])  # segment index 0 .. knots - 2
        t = (x - xs[j]) / (xs[j + 1] - xs[j])
        y = ys[j] + t * (ys[j + 1] - ys[j])
        out[i] = (y - y.mean()) / y.std().clamp_min(1e-6) * x.std() + x.mean()
    return out


def _discriminator_inputs(features: torch.Tensor, probs: torch.Tensor, domain: torch.Tensor,
                          token_level: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the discriminators see: (features (N, 2C), class probabilities (N, K), domain (N,)).

    features (2B, 2C, d, h, w), probs (2B, K, *patch), domain (2B,). Global: N = 2B, the patch
    averages. Token level: N = 2B * d * h * w, every position of the feature map with the
    probabilities averaged over the voxels it covers, so that the discriminator judges local
    appearance (as patch discriminators of segmentation UDA do) and sees 2B * dhw samples a step.
    """
    if not token_level:
        return features.mean(dim=(2, 3, 4)), probs.mean(dim=(2, 3, 4)), domain
    grid = features.shape[2:]
    g = torch.nn.functional.adaptive_avg_pool3d(probs, grid)  # 2B, K, d, h, w
    n = math.prod(grid)
    return (features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1]),
            g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1]), domain.repeat_interleave(n))


def _mean_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean voxel entropy of probabilities (B, K, *spatial), divided by log K: in [0, 1]."""
    return voxel_entropy(probs).mean() / math.log(probs.shape[1])


def plot_adaptation(path: str | os.PathLike, history: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]],
                    terms: Sequence[str]) -> Path:
    """Four panels per step/epoch: segmenter losses, discriminators, balancing weights and lambda, source Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    x = [r["step"] for r in steps]
    for key in ("loss", "loss_dice", "loss_ce", *(["loss_topology"] if "topology" in terms else [])):
        axes[0].plot(x, [r[key] for r in steps], lw=0.8, label=key.removeprefix("loss_"))
    axes[0].set(title="segmenter losses", xlabel="step")
    for term in ("marginal", "conditional"):
        if term in terms:
            axes[1].plot(x, [r[f"loss_{term}"] for r in steps], lw=0.8, label=f"{term} BCE")
            axes[1].plot(x, [r[f"disc_acc_{term}"] for r in steps], lw=0.8, ls="--", label=f"{term} accuracy")
    axes[1].axhline(math.log(2), color="grey", lw=0.5)  # BCE of a discriminator that cannot tell
    axes[1].set(title="domain discriminators", xlabel="step")
    for name in ("dice", "ce", *terms):
        axes[2].plot(x, [r[f"weight_{name}"] for r in steps], lw=0.8, label=f"w_{name}")
    axes[2].plot(x, [r["grl_lambda"] for r in steps], "k--", lw=0.8, label="GRL lambda")
    axes[2].set(title="loss weights (Def. 4) and GRL lambda", xlabel="step")
    val = [r for r in history if isinstance(r.get("source_val_dice"), float)]
    axes[3].plot([r["epoch"] for r in val], [r["source_val_dice"] for r in val], "k-o")
    axes[3].set(title="source validation Dice (diagnostic)", xlabel="epoch", ylim=(0, 1))
    for ax in axes[:3]:
        if ax.get_legend_handles_labels()[0]:  # topology alone leaves the discriminator panel empty
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    return Path(path)


# --- checks ----------------------------------------------------------------------------------
def _check_config(cfg: AdaptConfig) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise CrossModalNetError(f"adapt config: {key} must be {what}, got {getattr(cfg, key)!r}")

    for key in ("epochs", "iterations_per_epoch", "hidden", "max_outer", "random_dim"):
        need(isinstance(getattr(cfg, key), int) and getattr(cfg, key) >= 1, key, "a positive integer")
    need(cfg.batch_size is None or (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1), "batch_size",
         "a positive integer or null")
    for key in ("lr", "discriminator_lr"):
        need(isinstance(getattr(cfg, key), int | float) and getattr(cfg, key) > 0, key, "a positive number")
    need(0 <= cfg.dropout < 1, "dropout", "in [0, 1)")
    need(isinstance(cfg.feature_stage, int) and cfg.feature_stage <= -1, "feature_stage", "a negative integer")
    need(isinstance(cfg.entropy_weight, int | float) and cfg.entropy_weight >= 0, "entropy_weight",
         "a number >= 0")
    need(isinstance(cfg.source_remap, int | float) and 0 <= cfg.source_remap <= 1, "source_remap", "in [0, 1]")
    need(isinstance(cfg.topology_size, int) and cfg.topology_size >= 2, "topology_size", "an integer >= 2")
    need(cfg.topology_pool in POOLS, "topology_pool", " or ".join(repr(p) for p in POOLS))
    need(cfg.topology_bars in BARS, "topology_bars", " or ".join(repr(b) for b in BARS))
    need(cfg.max_minutes is None or cfg.max_minutes > 0, "max_minutes", "a positive number of minutes")
    need(isinstance(cfg.val_every, int) and cfg.val_every >= 0, "val_every", "an integer >= 0")


def _open_source_run(run: Path, out: Path) -> tuple[TrainConfig, Preprocessor]:
    """The source run's TrainConfig and preprocessing; refuses what adaptation cannot start from."""
    if not run.is_dir():
        raise CrossModalNetError(f"{run}: source run folder not found")
    if out.resolve() == run.resolve():
        raise CrossModalNetError(f"{out}: --out must be a new folder, not the source run")
    if not (run / ckpt.CONFIG).is_file():
        raise CrossModalNetError(f"{run}: not a run folder (no {ckpt.CONFIG}); train one with `crossmodalnet train`")
    if not (run / ckpt.BEST).is_file():
        raise CrossModalNetError(f"{run / ckpt.BEST}: not found; the source run has not finished (or validated "
                                 "once); train it first")
    config = load_run_config(run / ckpt.CONFIG)
    if config.model.name != "crossmodalnet":
        raise CrossModalNetError(f"{run / ckpt.CONFIG}: model {config.model.name!r}; adapt supports crossmodalnet "
                                 "only (it aligns CrossModalNet's fused bottleneck features)")
    return config, Preprocessor.load(run / ckpt.PREPROCESS)


def _open_out(out: Path, cfg: AdaptConfig, inputs: dict[str, str], resume: bool) -> dict[str, Any] | None:
    """Refuse an unsafe --out; on resume check the saved settings and return the saved state (or None)."""
    if out.exists() and not out.is_dir():
        raise CrossModalNetError(f"{out}: exists and is not a folder; choose another --out")
    if not resume:
        if out.exists() and any(out.iterdir()):
            raise CrossModalNetError(f"{out}: exists and is not empty; pass --resume to continue that adaptation "
                                     "or choose another --out")
        return None
    if not (out / ADAPT_CONFIG).is_file():
        raise CrossModalNetError(f"{out}: nothing to resume (no {ADAPT_CONFIG}); adapt without --resume")
    saved = read_yaml(out / ADAPT_CONFIG)
    for key, value in inputs.items():
        if saved.get(key) != value:
            raise CrossModalNetError(f"{out / ADAPT_CONFIG}: --resume refused, {key} was {saved.get(key)}, "
                                     f"now {value}")
    # config_differences compares any two dataclasses of one type, ignoring max_minutes and device.
    diffs = ckpt.config_differences(from_dict(AdaptConfig, saved.get("adapt", {}), str(out / ADAPT_CONFIG)), cfg)
    if diffs:
        raise CrossModalNetError(f"{out / ADAPT_CONFIG}: --resume refused, other settings ({'; '.join(diffs)})")
    last = ckpt.find_last(out)
    return ckpt.load_last(last) if last is not None else None


def _prepare_target(root: Path, preprocessor: Preprocessor) -> list[PreparedCase]:
    """Target training + validation cases in network space, images only, with a dummy all-zero label.

    Label files are never opened (nor required to exist): the images are read one by one.
    """
    dataset = load_dataset(root, check_files=False)  # checking files would stat the label paths too
    cases = [*dataset["training"], *dataset["validation"]]
    json_path = root / "dataset.json"
    if not cases:
        raise CrossModalNetError(f"{json_path}: lists no training or validation images to adapt to "
                                 "(the test split is kept for evaluation)")
    prepared = []
    for c in cases:
        if c.ct is None or c.mr is None:
            raise CrossModalNetError(f"{json_path}: target case {c.id!r} needs both CT and MR images")
        ct, grid = read_image(c.ct)
        mr, mr_grid = read_image(c.mr)
        check_same_grid({str(c.ct): grid, str(c.mr): mr_grid})
        case = preprocessor.prepare(ct, mr, grid, None, c.id)
        # A dummy label, so that PatchSampler can cache the case; all background: uniform patch centres.
        prepared.append(dataclasses.replace(case, label=np.zeros(case.shape, dtype=np.uint8)))
    return prepared


def adapt(source_run: str | os.PathLike, source_data: str | os.PathLike, target_data: str | os.PathLike,
          out_dir: str | os.PathLike, config: AdaptConfig | None = None, resume: bool = False) -> Path:
    """Adapt the model of `source_run` to the images of `target_data` into `out_dir` (see the module docstring)."""
    return Adapter(source_run, source_data, target_data, out_dir, config or AdaptConfig(), resume=resume).fit()


def adapt_from_cli(args: argparse.Namespace) -> None:
    """`crossmodalnet adapt RUN --source DATA --target DATA --out RUN2 [...]`: flags over --config over defaults."""
    if args.config is not None:
        config = load_yaml(AdaptConfig, args.config)
    elif args.resume and (Path(args.out) / ADAPT_CONFIG).is_file():
        saved = read_yaml(Path(args.out) / ADAPT_CONFIG)
        config = from_dict(AdaptConfig, saved.get("adapt", {}), str(Path(args.out) / ADAPT_CONFIG))
    else:
        config = AdaptConfig()
    if args.terms is not None:
        config.terms = parse_terms(args.terms)
    for key in ("epochs", "max_minutes", "lr", "seed", "device"):
        if getattr(args, key, None) is not None:
            setattr(config, key, getattr(args, key))
    adapt(args.run, args.source, args.target, args.out, config, resume=args.resume)

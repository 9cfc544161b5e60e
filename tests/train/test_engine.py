"""The one training engine: batches drawn in worker processes are the batches drawn in the loop,
no weight decay on norms/biases/position biases/placeholders, fp16 skips a non-finite step instead
of stopping, and validation scores with the rule `evaluate` reports."""

import math

import numpy as np
import pytest
import torch
from conftest import fast_config
from safetensors.torch import load_file
from torch import nn

from crossmodalnet.config import ModelConfig
from crossmodalnet.data.spec import MMWHS
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.evaluate import compute_case_metrics
from crossmodalnet.models.registry import build_model
from crossmodalnet.train.distributed import DistInfo, split_by_rank
from crossmodalnet.train.engine import (
    Engine,
    LoopSettings,
    Task,
    batch_iterator,
    param_groups,
    resolve_workers,
    training_autocast,
)
from crossmodalnet.train.trainer import case_dice, train


class _Counting:
    """batch(step) -> a tensor made from the step alone (and some numpy randomness seeded by it)."""

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(step)
        return {"x": torch.from_numpy(rng.normal(size=(2, 3))).float(), "step": torch.tensor(step)}


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_processes_draw_the_same_batches_in_the_same_order(workers):
    inline = list(batch_iterator(_Counting(), 3, 11, num_workers=0))
    background = list(batch_iterator(_Counting(), 3, 11, num_workers=workers))
    assert [int(b["step"]) for b in background] == list(range(3, 11))
    for a, b in zip(inline, background, strict=True):
        assert torch.equal(a["x"], b["x"])


def test_training_with_workers_gives_the_same_weights(ellipsoid_data, tmp_path):
    a = train(ellipsoid_data, tmp_path / "a", fast_config(num_workers=0))
    b = train(ellipsoid_data, tmp_path / "b", fast_config(num_workers=2))
    wa, wb = load_file(a / "last" / "model.safetensors"), load_file(b / "last" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a / "steps.csv").read_text() == (b / "steps.csv").read_text()


def test_workers_default_to_none_on_a_cpu_and_two_on_a_gpu():
    assert resolve_workers(None, torch.device("cpu")) == 0
    assert resolve_workers(None, torch.device("cuda")) == 2
    assert resolve_workers(3, torch.device("cpu")) == 3


def test_no_weight_decay_on_norms_biases_position_biases_and_placeholders():
    model = build_model("crossmodalnet", ModelConfig.from_size("crossmodalnet", "tiny"))
    decay, no_decay = param_groups([model], 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert exempt | decayed == set(names.values()) and not exempt & decayed
    assert all(model.get_parameter(n).ndim <= 1 for n in exempt if not n.endswith("bias.table"))
    assert any(n.endswith("attn.bias.table") for n in exempt)  # relative position biases: 2-D, exempt by name
    assert any("placeholders" in n for n in exempt) and any(n.endswith("norm1.weight") for n in exempt)
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert any("qkv.weight" in n or n.endswith(".q.weight") for n in decayed)


class _ExplodingTask(Task):
    """A linear model whose loss is infinite at one step."""

    columns = ("loss",)

    def __init__(self, bad_step: int) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.optimizers = [torch.optim.SGD(self.model.parameters(), lr=0.1)]
        self.batches, self.bad_step = _Counting(), bad_step

    def loss(self, model, batch, step):
        out = model(batch["x"]).pow(2).mean()
        if step == self.bad_step:
            out = out * math.inf
        return out, {"loss": out.detach()}


def test_a_non_finite_loss_stops_fp32_but_fp16_skips_the_step():
    settings = LoopSettings(total_steps=4, iterations_per_epoch=4, desc="")
    with pytest.raises(CrossModalNetError, match="stopped at step 2: loss is inf"):
        Engine(_ExplodingTask(2), settings, dist=DistInfo()).fit()
    task = _ExplodingTask(2)
    engine = Engine(task, settings, dist=DistInfo())
    # What precision fp16 gives on CUDA: a gradient scaler (here on the CPU, to test the skip itself).
    engine.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    engine.train_step(task.batches.batch(0))
    engine.train_step(task.batches.batch(1))
    after_two = {k: v.clone() for k, v in task.model.state_dict().items()}
    assert any(not torch.equal(before[k], after_two[k]) for k in before)
    engine.train_step(task.batches.batch(2))  # inf: skipped, the run goes on
    assert engine.skipped == 1 and engine.scaler.get_scale() < 2.0**4
    assert all(torch.equal(after_two[k], v) for k, v in task.model.state_dict().items())
    engine.train_step(task.batches.batch(3))
    assert engine.step == 4


def test_mixed_precision_bf16_first_on_cuda_and_only_when_asked_on_the_cpu():
    cpu = torch.device("cpu")
    assert all(training_autocast(p, cpu) == (None, False) for p in ("auto", "fp16", "fp32"))
    assert training_autocast("bf16", cpu) == (torch.bfloat16, False)
    assert training_autocast("fp32", torch.device("cuda")) == (None, False)
    assert training_autocast("fp16", torch.device("cuda")) == (torch.float16, True)
    assert training_autocast("bf16", torch.device("cuda")) == (torch.bfloat16, False)
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    expected = (torch.bfloat16, False) if bf16 else (torch.float16, True)
    assert training_autocast("auto", torch.device("cuda")) == expected


def test_validation_dice_is_the_dice_evaluate_reports():
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16, 16), dtype=np.uint8)
    label[2:8, 2:8, 2:8], label[9:14, 3:9, 4:12] = 1, 3
    pred = label.copy()
    pred[2:5, 2:8, 2:8] = 2  # structure 2: predicted, absent from the reference -> 0
    pred[rng.random(pred.shape) < 0.05] = 3
    dice = case_dice(pred, label, MMWHS)
    rows = compute_case_metrics(pred, label, (1.0, 1.0, 1.0), MMWHS)
    for c in range(1, 8):
        reported, ours = rows[c - 1]["dice"], float(dice[c - 1])
        assert (math.isnan(reported) and math.isnan(ours)) or reported == pytest.approx(ours)
    assert float(dice[1]) == 0.0 and math.isnan(float(dice[3]))  # LA predicted only; RA nowhere


def test_validation_cases_are_split_across_ranks():
    cases = list(range(7))
    shares = [split_by_rank(cases, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert sorted(x for s in shares for x in s) == cases and [len(s) for s in shares] == [3, 2, 2]


class _Quadratic(Task):
    """A linear model, SGD, and a linear decay to zero over the schedule's horizon."""

    columns = ("loss",)

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1)
        self.optimizers = [torch.optim.SGD(self.model.parameters(), lr=1.0)]
        self.batches = _Counting()

    def lr_factor(self, step: int, total_steps: int) -> float:
        return max(0.0, 1.0 - step / total_steps)

    def loss(self, model, batch, step):
        out = model(batch["x"]).pow(2).mean()
        return out, {"loss": out.detach()}


def test_a_time_budget_fits_the_schedule_to_the_steps_it_allows(monkeypatch):
    # A fake clock of 1 s per step: a 1-minute budget allows 60 of the 1000 steps asked for, and the
    # schedule's horizon follows the pace (after the first steps) instead of staying at 1000.
    clock = {"t": 0.0}
    monkeypatch.setattr("crossmodalnet.train.engine.time.monotonic", lambda: clock["t"])
    task = _Quadratic()
    engine = Engine(task, LoopSettings(total_steps=1000, iterations_per_epoch=1000, max_minutes=1.0, desc=""),
                    dist=DistInfo())
    stopped, lrs = False, []
    while not stopped:
        clock["t"] += 1.0
        stopped = engine.train_step(task.batches.batch(engine.step))
        lrs.append(task.optimizers[0].param_groups[0]["lr"])
    assert engine.step == 61 and engine.horizon == 62  # stopped past 60 s; the schedule ends there
    assert lrs[5] == pytest.approx(1.0 - 6 / 1000)  # before the pace is known: the full schedule
    assert lrs[-1] < 0.05  # annealed at the budget (it would be 0.94 on the 1000-step schedule)
    # Without a budget the horizon is total_steps: the schedule of before, step for step.
    plain = Engine(_Quadratic(), LoopSettings(total_steps=1000, iterations_per_epoch=1000, desc=""), dist=DistInfo())
    for step in range(20):
        plain.train_step(plain.task.batches.batch(step))
    assert plain.horizon == 1000 and plain.task.optimizers[0].param_groups[0]["lr"] == pytest.approx(1 - 20 / 1000)


class _Threshold(nn.Module):
    """Class 1 where channel 0 exceeds 0.5, else background: segments exactly what the image shows."""

    def forward(self, image, present=None):
        logits = torch.full((image.shape[0], 8, *image.shape[2:]), -10.0)
        logits[:, 1:2] = 10 * (image[:, :1] - 0.5)
        logits[:, 0:1] = -10 * (image[:, :1] - 0.5)
        return logits


def _case(image: np.ndarray, label: np.ndarray):
    from crossmodalnet.data.io import Geometry
    from crossmodalnet.data.preprocess import PreparedCase

    return PreparedCase("c", [image, image], label, Geometry.from_spacing(image.shape, (1.0, 1.0, 1.0)),
                        np.array([[0, 1], [1, 1], [2, 1]]), image.shape)


def test_postprocessing_keeps_the_largest_component_only_where_validation_dice_rises():
    from crossmodalnet.config import TrainConfig
    from crossmodalnet.train.trainer import choose_postprocessing, validation_dice

    image = np.zeros((16, 16, 16), dtype=np.float32)
    image[2:10, 2:10, 2:10] = 1.0  # 512 voxels
    image[13:15, 13:15, 13:15] = 1.0  # 8 voxels far away
    cfg = TrainConfig(model=ModelConfig.from_size("unet", "tiny"), patch_size=(16, 16, 16), sw_batch_size=1)
    island = (image > 0.5).astype(np.uint8)
    island[13:15, 13:15, 13:15] = 0  # the far blob is a false positive
    record = choose_postprocessing(_Threshold(), [_case(image, island)], cfg, torch.device("cpu"), MMWHS)
    assert record["largest_component"] is True and record["cases"] == 1
    assert record["score"] == pytest.approx(2 * 512 / (520 + 512)) and record["score_largest_component"] == 1.0
    # The same score as validation: one pass computes both.
    assert record["score"] == pytest.approx(validation_dice(_Threshold(), [_case(image, island)], cfg,
                                                            torch.device("cpu"), MMWHS)["val_dice_mean"])
    both = (image > 0.5).astype(np.uint8)  # the far blob is a real second piece: removing it would cost Dice
    record = choose_postprocessing(_Threshold(), [_case(image, both)], cfg, torch.device("cpu"), MMWHS)
    assert record["largest_component"] is False and record["score"] == 1.0
    assert record["score_largest_component"] == pytest.approx(2 * 512 / (512 + 520))
    empty = choose_postprocessing(_Threshold(), [], cfg, torch.device("cpu"), MMWHS)
    assert empty == {"largest_component": False, "cases": 0, "score": None, "score_largest_component": None}


def test_bf16_on_the_cpu_computes_the_forward_in_bfloat16_and_keeps_float32_weights():
    seen: list[torch.dtype] = []
    for precision in ("fp32", "bf16"):
        task = _ExplodingTask(bad_step=-1)
        task.model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        engine = Engine(task, LoopSettings(total_steps=2, iterations_per_epoch=2, precision=precision, desc=""),
                        dist=DistInfo())
        before = task.model.weight.detach().clone()
        engine.train_step(task.batches.batch(0))
        assert task.model.weight.dtype == torch.float32 and not torch.equal(before, task.model.weight)
    assert seen == [torch.float32, torch.bfloat16]

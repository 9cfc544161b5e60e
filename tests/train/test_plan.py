"""Plans from fingerprints (issue 18): every number checked against the rule that made it.

Four synthetic fingerprints: the phantom (isotropic 2.25 mm, 64^3), MyoPS-like (0.73 mm in plane,
12-23 mm slices, 3-6 slices of 480^2), ACDC-like (1.56 mm, 5-10 mm slices, about 9 of 216 x 256)
and MM-WHS-CT-like (0.4 x 0.4 x 0.8 mm, 512 x 512 x 250).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossmodalnet.config import ModelConfig, TrainConfig, replace
from crossmodalnet.data.fingerprint import Fingerprint
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models.registry import build_model
from crossmodalnet.train.plan import (
    ANISOTROPY,
    BUDGETS,
    COVERAGE,
    DOWNSAMPLE_RATIO,
    MIN_BATCH_2D,
    MIN_EDGE,
    apply_plan,
    make_plan,
    model_steps,
)
from crossmodalnet.train.preflight import planned

CMN = ModelConfig.from_size("crossmodalnet", "small")
_RNG = np.random.default_rng(0)
FINGERPRINTS = {
    "phantom": Fingerprint("canonical", ((2.25, 2.25, 2.25),) * 30, ((64, 64, 64),) * 30),
    "myops": Fingerprint("stored", tuple((0.73, 0.73, float(z)) for z in _RNG.choice([12.0, 14.0, 23.0], 25)),
                         tuple((480, 480, int(n)) for n in _RNG.choice([3, 4, 5, 6], 25))),
    "acdc": Fingerprint("canonical", tuple((1.5625, 1.5625, float(z)) for z in _RNG.choice([5.0, 6.5, 10.0], 99)),
                        tuple((216, 256, int(n)) for n in _RNG.choice([6, 9, 10, 12], 99))),
    "mmwhs_ct": Fingerprint("canonical", ((0.4, 0.4, 0.8),) * 20, ((512, 512, 250),) * 20),
}


def _steps(plan) -> list[tuple[int, int, int]]:
    return [(2, 2, 2)] * model_steps(CMN) if plan.strides is None else list(plan.strides)


@pytest.mark.parametrize("name", list(FINGERPRINTS))
def test_every_number_follows_its_rule_in_3d(name):
    fp, budget = FINGERPRINTS[name], BUDGETS["cpu"]
    plan = make_plan(fp, CMN, "cpu", configuration="3d")
    assert plan.configuration == "3d"
    median, p10 = np.array(fp.median_spacing), np.array(fp.spacing_percentile(10))
    target = np.array(plan.target_spacing)
    # Rule 1: a slice axis takes the 10th percentile; rule 2 coarsens only the other axes, alike.
    thin = [a for a in range(3) if median[a] > ANISOTROPY * median.min()]
    for a in thin:
        assert target[a] == pytest.approx(p10[a])
    fine = [a for a in range(3) if a not in thin]
    factors = target[fine] / median[fine]
    assert np.allclose(factors, factors[0]) and factors[0] >= 1.0
    shape = np.array(fp.median_shape_at(target))
    need = np.array([shape[a] if a in thin else COVERAGE * shape[a] for a in range(3)])
    assert np.prod(need) <= budget.patch_voxels * 1.001  # the coarsening made it fit
    if factors[0] > 1.0:  # and was needed: at the median spacing it did not fit
        shape0 = np.array(fp.median_shape_at([p10[a] if a in thin else median[a] for a in range(3)]))
        need0 = [shape0[a] if a in thin else COVERAGE * shape0[a] for a in range(3)]
        assert np.prod(np.ceil(need0)) > budget.patch_voxels
    # Rule 4: each step halves exactly the axes at most twice the finest that keep MIN_EDGE voxels.
    spacing, size = target.copy(), np.array(plan.patch_size, dtype=float)
    for step in _steps(plan):
        expected = tuple(2 if spacing[a] <= DOWNSAMPLE_RATIO * spacing.min() and size[a] / 2 >= MIN_EDGE else 1
                         for a in range(3))
        assert step == expected
        spacing, size = spacing * step, size / step
    # Rule 3: within the budget, a multiple of the total stride, no larger than the median shape
    # allows, and maximal: one more stride on the widest axis would break the budget.
    divisor = np.prod(np.array(_steps(plan)), axis=0)
    patch = np.array(plan.patch_size)
    assert np.prod(patch) <= budget.patch_voxels and (patch % divisor == 0).all()
    assert (patch <= np.maximum(divisor, np.round(shape / divisor) * divisor)).all()
    widest = int(np.argmax(patch * target))
    grown = patch.copy()
    grown[widest] += divisor[widest]
    cap = np.round(shape[widest] / divisor[widest]) * divisor[widest]
    assert np.prod(grown) > budget.patch_voxels or grown[widest] > cap
    # Rule 7: the batch fills the step budget.
    assert plan.batch_size == int(np.clip(budget.step_voxels // np.prod(patch), budget.min_batch, budget.max_batch))
    assert len(plan.reasons) >= 4 and all(isinstance(r, str) and r for r in plan.reasons)
    json.dumps(plan.to_dict())  # plans.json holds it


@pytest.mark.parametrize("name", ["myops", "acdc"])
@pytest.mark.parametrize("model", ["crossmodalnet", "dynunet", "unet"])
def test_thick_slices_make_a_2d_plan(name, model):
    """A slice axis (over 3x the finest): slices as stored, one-slice patches, no stride, window or
    kernel along it, a batch of at least MIN_BATCH_2D slices filling the step budget."""
    fp, budget = FINGERPRINTS[name], BUDGETS["cpu"]
    config = ModelConfig.from_size(model, "small")
    plan = make_plan(fp, config, "cpu")
    median = np.array(fp.median_spacing)
    assert plan.configuration == "2d" and plan.target_spacing[2] is None and plan.patch_size[2] == 1
    # In plane: the median, coarsened alike only as far as half the field of view needs to fit a patch.
    factors = np.array(plan.target_spacing[:2]) / median[:2]
    assert np.allclose(factors, factors[0]) and factors[0] >= 1.0
    patch_budget = budget.step_voxels // MIN_BATCH_2D
    shape = np.array(fp.median_shape_at(plan.target_spacing))
    assert shape[2] == np.median([s[2] for s in fp.shapes])  # slices counted as stored
    assert np.prod(COVERAGE * shape[:2]) <= patch_budget * 1.001
    if factors[0] > 1.0:
        assert np.prod(np.ceil(COVERAGE * np.array(fp.median_shape_at([*median[:2], None])[:2]))) > patch_budget
    assert np.prod(plan.patch_size) <= patch_budget
    assert all(s[2] == 1 for s in plan.strides) and all(s[:2] == (2, 2) for s in plan.strides)
    assert plan.batch_size == max(MIN_BATCH_2D, budget.step_voxels // int(np.prod(plan.patch_size)))
    if model == "crossmodalnet":
        # The cube's tokens in plane: 4^3 = 64 -> 8 x 8 x 1.
        assert plan.window_size == (8, 8, 1) and CMN.window_size == 4 and plan.kernels is None
    else:
        assert plan.window_size is None and all(k == (3, 3, 1) for k in plan.kernels)
        assert len(plan.kernels) == len(plan.strides) + 1
    assert any("2D plan" in r for r in plan.reasons)
    assert json.loads(json.dumps(plan.to_dict()))["target_spacing"][2] is None
    # The model builds with it and keeps a one-slice patch one slice thick.
    planned_config, _ = planned(TrainConfig(model=config), fp, "cpu")
    net = build_model(model, replace(planned_config.model, modalities=2 if model == "crossmodalnet" else 1))
    c = 2 if model == "crossmodalnet" else 1
    out = net.eval()(torch.zeros(1, c, 32, 32, 1))
    assert out.shape[2:] == (32, 32, 1)


def test_isotropic_data_can_be_planned_in_2d_along_the_coarsest_axis():
    fp = Fingerprint("canonical", ((1.0, 1.0, 1.5),) * 10, ((128, 128, 100),) * 10)
    plan = make_plan(fp, CMN, "cpu", configuration="2d")
    assert plan.configuration == "2d" and plan.target_spacing[2] is None and plan.patch_size[2] == 1
    assert make_plan(fp, CMN, "cpu").configuration == "3d"  # auto: no slice axis, 3d
    with pytest.raises(CrossModalNetError, match="configuration must be one of"):
        make_plan(fp, CMN, "cpu", configuration="2.5d")


def test_the_phantom_plan_is_the_unplanned_cpu_model():
    plan = make_plan(FINGERPRINTS["phantom"], CMN, "cpu")
    assert plan.target_spacing == (2.25, 2.25, 2.25) and plan.patch_size == (48, 48, 48) and plan.batch_size == 2
    assert plan.strides is None and plan.window_size == CMN.window_size and plan.kernels is None


def test_thick_slices_stay_whole_and_are_not_downsampled_first_in_3d():
    plan = make_plan(FINGERPRINTS["myops"], CMN, "cpu", configuration="3d")
    median_slices = np.median([s[2] for s in FINGERPRINTS["myops"].shapes])
    assert plan.orientation == "stored" and plan.target_spacing[2] == 12.0
    assert plan.patch_size[2] >= median_slices  # every slice of the median case in one patch
    assert [s[2] for s in plan.strides[:3]] == [1, 1, 1]  # 12 mm slices: not halved while in-plane is finer
    assert plan.patch_size[0] == plan.patch_size[1] and plan.patch_size[0] * plan.target_spacing[0] >= 150  # mm
    assert any("slice axis" in r for r in plan.reasons) and any("in-plane spacing" in r for r in plan.reasons)


def test_an_axis_never_downsampled_is_one_window():
    # Two slices of 20 mm at 1 mm in plane: the slice axis keeps stride 1 through all four steps.
    fp = Fingerprint("stored", ((1.0, 1.0, 20.0),) * 10, ((100, 100, 2),) * 10)
    plan = make_plan(fp, CMN, "cpu", configuration="3d")
    assert all(s[2] == 1 for s in plan.strides) and plan.patch_size[2] == 2
    assert plan.window_size == (4, 4, 2)


def test_a_2d_plan_keeps_a_per_axis_window_as_given():
    # A cube is widened in plane (test above); three numbers are the user's window, not a cube to widen.
    config = replace(CMN, window_size=(6, 6, 1))
    assert make_plan(FINGERPRINTS["myops"], config, "cpu").window_size == (6, 6, 1)
    assert make_plan(FINGERPRINTS["myops"], replace(CMN, window_size=2), "cpu").window_size == (3, 3, 1)  # 2^1.5


def test_apply_plan_fills_only_what_the_configuration_leaves_open():
    plan = make_plan(FINGERPRINTS["myops"], CMN, "cpu")
    open_config = apply_plan(TrainConfig(model=CMN), plan)
    assert open_config.patch_size == plan.patch_size and open_config.batch_size == plan.batch_size
    assert open_config.target_spacing == plan.target_spacing and open_config.orientation == "stored"
    assert open_config.model.strides == plan.strides
    fixed = apply_plan(TrainConfig(model=CMN, patch_size=(32, 32, 32), batch_size=4, target_spacing=(1.0, 1.0, 1.0),
                                   orientation="canonical"), plan)
    assert (fixed.patch_size, fixed.batch_size, fixed.target_spacing, fixed.orientation) == (
        (32, 32, 32), 4, (1.0, 1.0, 1.0), "canonical")


def test_a_gpu_budget_keeps_the_fine_spacing():
    plan = make_plan(FINGERPRINTS["acdc"], CMN, "cuda")
    assert plan.target_spacing[:2] == pytest.approx(FINGERPRINTS["acdc"].median_spacing[:2])


def test_a_model_that_cannot_take_the_plan_is_refused_with_the_reason():
    config = TrainConfig(model=ModelConfig.from_size("swinunetr", "tiny"))
    with pytest.raises(CrossModalNetError, match=r"swinunetr is not applicable to this dataset's plan: .*32"):
        planned(config, FINGERPRINTS["myops"], "cpu")
    isotropic, _ = planned(config, FINGERPRINTS["phantom"], "cpu")  # the phantom: as before plans
    assert isotropic.patch_size == (48, 48, 48) and isotropic.model.strides is None
    unplanned, plan = planned(TrainConfig(model=CMN, plan=False), FINGERPRINTS["myops"], "cpu")
    assert plan is None and unplanned.patch_size == (64, 64, 64) and unplanned.batch_size == 2

"""The audit: the known-false scale invariance is found with a counterexample, and every verdict
follows the numbers of the model at hand (two tiny models give different numbers; a model built
to satisfy a property flips its verdict)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmodalnet.analysis.audit import (
    CONDITIONAL,
    FAILS,
    HOLDS,
    NOT_TESTABLE,
    VERDICTS,
    AnalysisCase,
    audit_model,
    balancing_experiment,
    check_attention_complexity,
    check_balancing_log,
    check_base_case,
    check_cross_attention,
    check_deformable_capacity,
    check_information_flow,
)
from crossmodalnet.analysis.cmif import load_analysis_cases, untrained_model
from crossmodalnet.cli import main
from crossmodalnet.config import ModelConfig, TrainConfig, dump_yaml
from crossmodalnet.data.dataset import load_case, load_dataset
from crossmodalnet.data.preprocess import fit_preprocessor
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.runs import RunFolder, save_weights

BEST, CONFIG, PREPROCESS = RunFolder.WEIGHTS, RunFolder.CONFIG, RunFolder.PREPROCESS

SMALL_TIMING = {"global_tokens": (256, 512, 1024, 2048), "windowed_tokens": (2048, 4096, 8192, 16384), "repeats": 3}
QUICK_LIPSCHITZ = {"random_draws": 2, "power_iterations": 2}


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0, **overrides) -> torch.nn.Module:
    return untrained_model(ModelConfig.from_size("crossmodalnet", "tiny"), seed, **overrides)


@pytest.fixture(scope="module")
def cases(tiny_dataset) -> list[AnalysisCase]:
    dataset = load_dataset(tiny_dataset)
    prep = fit_preprocessor([load_case(c, dataset.spec) for c in dataset["training"]], dataset.spec.channels)
    return load_analysis_cases(tiny_dataset, prep, cases=2, split="training")


def _claim(claims, name):
    return next(c for c in claims if c.claim == name)


def test_scale_invariance_fails_with_a_counterexample(cases):
    claims = check_cross_attention(_tiny(0), cases)
    scale = _claim(claims, "Theorem 2.1 (scale invariance)")
    assert scale.verdict == FAILS
    ex = scale.numbers["counterexample"]
    assert ex["c"] == 2.0
    assert abs(ex["CA(cFa, cFb)"] - ex["c*CA(Fa, Fb)"]) > 1e-3 * abs(ex["c*CA(Fa, Fb)"])
    # Softmax(c² x) is sharper than Softmax(x) for c > 1: the reason the proof's step is false.
    assert ex["mean max attention weight at c=2"] > ex["mean max attention weight at c=1"]
    assert scale.numbers["max_relative_error_def2"] > 1e-2
    assert _claim(claims, "Theorem 2.1 (asymmetry)").verdict == HOLDS
    perm = _claim(claims, "Theorem 2.1 (permutation equivariance)").numbers
    assert perm["max_relative_error_def2"] < 1e-5 < perm["max_relative_error_with_position_bias"]


def test_scale_verdict_flips_when_the_logits_are_constant(cases):
    # W_Q = 0: every logit row is constant, Softmax is uniform for every c, and Def. 2 becomes
    # exactly homogeneous; the audit must say so from the numbers.
    model = _tiny(0)
    for block in model.cross:
        for direction in block.refine:
            torch.nn.init.zeros_(direction.attn.q.weight)
    scale = _claim(check_cross_attention(model, cases), "Theorem 2.1 (scale invariance)")
    assert scale.verdict == HOLDS
    assert scale.numbers["max_relative_error_def2"] < 1e-5


@pytest.mark.parametrize("table_std, verdict", [(0.0, HOLDS), (1.0, CONDITIONAL)])
def test_permutation_verdict_follows_the_position_bias(cases, table_std, verdict):
    # Without a relative position bias the model's attention is Def. 2 (equivariant); with a strong one it is not.
    model = _tiny(0)
    gen = torch.Generator().manual_seed(0)
    for block in model.cross:
        for direction in block.refine:
            table = direction.attn.bias.table
            table.data = table_std * torch.randn(table.shape, generator=gen)
    perm = _claim(check_cross_attention(model, cases), "Theorem 2.1 (permutation equivariance)")
    assert perm.verdict == verdict


def test_numbers_differ_between_two_tiny_models(cases):
    a = audit_model(_tiny(0), cases[:1], lipschitz_edge=32, timing=SMALL_TIMING, lipschitz=QUICK_LIPSCHITZ)
    b = audit_model(_tiny(1, cross_attention="paper"), cases[:1], lipschitz_edge=32, timing=SMALL_TIMING,
                    lipschitz=QUICK_LIPSCHITZ)
    assert [c.claim for c in a["claims"]] == [c.claim for c in b["claims"]]
    assert all(c.verdict in VERDICTS for c in a["claims"] + b["claims"])

    def number(result, claim, key):
        return _claim(result["claims"], claim).numbers[key]

    for claim, key in [("Theorem 2.1 (scale invariance)", "max_relative_error_def2"),
                       ("Theorem 2.1 (asymmetry)", "min_relative_difference"),
                       ("Theorem 2.6", "empirical_gradient_direction"),
                       ("Theorem 2.6", "log10_bound_paths"),
                       ("Theorem 2.4", "mi_mean")]:
        assert number(a, claim, key) != number(b, claim, key), (claim, key)
    # Same input data: the base case does not depend on the model.
    assert number(a, "Theorems 2.4/2.7, base case", "gaussian") == number(b, "Theorems 2.4/2.7, base case", "gaussian")
    emp = _claim(a["claims"], "Theorem 2.6").numbers
    # Power iteration finds a direction far more sensitive than random ones.
    assert emp["empirical_gradient_direction"] > 2 * emp["empirical_random"]


def test_structural_verdicts_follow_the_configuration(cases):
    deform = check_deformable_capacity(_tiny(0), cases[0])
    assert deform.verdict == FAILS
    op = deform.numbers["operators"]["cross1.refine.0"]
    assert op["map_DHW"] == [8, 8, 8] and op["paper_3KDHW"] == 3 * 4 * 512 and op["parameters"] == 2 * 12 + 16 * 12 + 16
    assert check_deformable_capacity(_tiny(0, deformable=False), cases[0]).verdict == NOT_TESTABLE
    assert {c.verdict for c in check_cross_attention(_tiny(0, cross_blocks=False), cases)} == {NOT_TESTABLE}


def test_lemma1_global_grows_faster_than_windowed():
    row = check_attention_complexity(_tiny(0), **SMALL_TIMING)
    g, w = row.numbers["global"]["exponent"], row.numbers["windowed"]["exponent"]
    assert g > w
    assert row.verdict in (HOLDS, CONDITIONAL, FAILS)


def _layers(values_per_case):
    """Summarised layers (as summarize_flow makes them) from per-layer lists of per-case MI."""
    out = []
    for i, vals in enumerate(values_per_case):
        row = {"name": ["input", "stem", "stage1", "cross1"][i], "mi": {"gaussian": vals},
               "mi_mean": {"gaussian": float(np.mean(vals))}, "cmif": {}, "cmif_mean": {}}
        if i:
            diff = [a - b for a, b in zip(vals, values_per_case[i - 1], strict=True)]
            row["cmif"]["gaussian"], row["cmif_mean"]["gaussian"] = diff, float(np.mean(diff))
        out.append(row)
    return out


def test_information_flow_verdicts_follow_the_numbers():
    rising = check_information_flow(_layers([[0.1, 0.1], [0.2, 0.2], [0.4, 0.4], [0.8, 0.8]]), ["gaussian"], 2)
    assert [c.verdict for c in rising] == [HOLDS, HOLDS, HOLDS]
    falling = check_information_flow(_layers([[0.9, 1.0], [0.5, 0.6], [0.6, 0.7], [0.3, 0.35]]), ["gaussian"], 2)
    assert [c.verdict for c in falling] == [FAILS, FAILS, FAILS]
    assert falling[0].numbers["decreases"]["gaussian"][0].startswith("stem")


def test_base_case_fails_on_registered_images_and_holds_on_independent_ones(cases):
    assert check_base_case(cases, ["gaussian"]).verdict == FAILS
    gen = torch.Generator().manual_seed(0)
    noise = [AnalysisCase(c.id, torch.cat([c.channel(0), torch.randn(c.channel(1).shape, generator=gen)], 1), None)
             for c in cases]
    independent = check_base_case(noise, ["gaussian"])
    assert independent.verdict == HOLDS
    assert max(independent.numbers["gaussian"]["mi_per_case"]) < 0.01


def _write_steps(path: Path, weights) -> None:
    with path.open("w") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "weight_dice", "weight_ce"])
        writer.writerows([i, w, 1 - w] for i, w in enumerate(weights))


def test_balancing_verdict_from_the_log(tmp_path, cases):
    steps = np.arange(80)
    _write_steps(tmp_path / "steps.csv", 0.5 + 0.2 * (1 - np.exp(-steps / 8)))
    assert check_balancing_log(tmp_path, 1.0)[0].verdict == HOLDS
    _write_steps(tmp_path / "steps.csv", 0.5 + 0.1 * np.sin(steps))
    rows = check_balancing_log(tmp_path, 1.0)
    assert rows[0].verdict == FAILS and rows[1].verdict == NOT_TESTABLE
    exp = balancing_experiment(cases, alpha=1.0, steps=3, patch=32)
    assert exp["summary"]["steps"] == 3 and exp["summary"]["first"] == 0.5  # uniform at the first step


def test_cli_end_to_end(tiny_dataset, tmp_path, capsys):
    cfg = TrainConfig(model=ModelConfig.from_size("crossmodalnet", "tiny"), patch_size=(32, 32, 32), device="cpu")
    run = tmp_path / "run"
    run.mkdir()
    dump_yaml(cfg, run / CONFIG)
    save_weights(_tiny(0), run / BEST, cfg.model)
    dataset = load_dataset(tiny_dataset)
    fit_preprocessor([load_case(c, dataset.spec) for c in dataset["training"]], dataset.spec.channels).save(
        run / PREPROCESS)
    out = tmp_path / "audit"
    assert main(["audit", str(run), str(tiny_dataset), "--out", str(out), "--cases", "1",
                 "--balancing-steps", "2", "--power-iterations", "1"]) == 0
    data = json.loads((out / "audit.json").read_text())
    verdicts = {c["claim"]: c["verdict"] for c in data["claims"]}
    assert verdicts["Theorem 2.1 (scale invariance)"] == FAILS
    assert verdicts["Theorem 2.3"] == NOT_TESTABLE
    assert "Theorem 2.5 (weights converge)" in verdicts and "Corollary 2" in verdicts
    md = (out / "audit.md").read_text()
    assert md.count("\n| ") == len(data["claims"]) + 1  # header + one row per claim
    assert "side experiment" in md  # this run did not balance its losses
    assert "Theorem 2.2" in capsys.readouterr().out


def test_three_channels_every_refinement_against_every_other_stream(cases):
    # A third channel (the first one again, shifted): the attention claims cover every stream pair.
    three = [AnalysisCase(c.id, torch.cat([c.image, c.channel(0).roll(3, dims=2)], 1), c.label) for c in cases]
    model = _tiny(0, modalities=3)
    asym = _claim(check_cross_attention(model, three), "Theorem 2.1 (asymmetry)")
    assert sorted(asym.numbers["per_block"])[:6] == [f"cross1.refine.{r}.from{j}" for r in range(3)
                                                      for j in range(3) if j != r]
    deform = check_deformable_capacity(model, three[0])
    assert sorted(deform.numbers["operators"])[:3] == ["cross1.refine.0", "cross1.refine.1", "cross1.refine.2"]
    result = audit_model(model, three[:1], lipschitz_edge=32, timing=SMALL_TIMING, lipschitz=QUICK_LIPSCHITZ,
                         pair=(0, 2))
    base = _claim(result["claims"], "Theorems 2.4/2.7, base case")
    assert "channels [0, 2]" in base.test
    with pytest.raises(CrossModalNetError, match="single channel"):
        audit_model(_tiny(0, modalities=1), [AnalysisCase("c", cases[0].channel(0), None)])

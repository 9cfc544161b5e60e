"""benchmarks/compare.py without training anything: planning, tables, the markdown section, perturbations.

Benchmarks are run by hand (they take minutes to hours); this only checks that the harness's
bookkeeping and formatting are right on a fabricated result set whose answers are known.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _files  # noqa: E402
import _machine  # noqa: E402
import _perturb  # noqa: E402
import _plan  # noqa: E402
import _plots  # noqa: E402
import _report  # noqa: E402
import _runner  # noqa: E402
import _schedule  # noqa: E402
import _scoring  # noqa: E402
import plans  # noqa: E402
import train_step  # noqa: E402


def _train_result(dices: list[float], **extra: object) -> dict:
    per_case = {f"case_{i}": {"dice": d, "iou": d - 0.1, "hd95": 5.0 + i} for i, d in enumerate(dices)}
    test = {"mean_dice": float(np.mean(dices)), "miou": float(np.mean(dices)) - 0.1, "mean_hd95": 5.5,
            "per_case": per_case, "dice_spread": _scoring.spread(dices),
            "iou_spread": _scoring.spread([d - 0.1 for d in dices]),
            "hd95_spread": _scoring.spread([5.0 + i for i in range(len(dices))])}
    return {"status": "ok", "fits": True, "budget_bound": True, "steps_done": 100, "steps_target": 120,
            "s_per_step": 0.5, "params": 2_000_000, "gflops": 3.0, "flops_edge": 32, "latency": {"median_s": 0.2},
            "peak_rss_mib": 700.0, "best_val_dice": 0.7, "best_step": 90, "loadavg": [1.0, 1.2], "test": test,
            **extra}


def _dice(values: dict[str, float]) -> dict:
    return {k: {"mean_dice": v} for k, v in values.items()}


@pytest.fixture
def fabricated(tmp_path: Path) -> tuple[_plan.Settings, list[dict], dict[str, dict]]:
    s = _plan.Settings(work=tmp_path, models=("crossmodalnet", "unet"), model_size="tiny", cases=8, edge=32,
                         patch=32, ablations=True, robustness=True)
    jobs = _plan.plan(s)
    results = {j["key"]: _train_result([0.5, 0.6]) for j in jobs if j["kind"] == "train"}
    results["budget-crossmodalnet"] = _train_result([0.8, 0.9])
    results["budget-unet"] = _train_result([0.7, 0.6])
    results["steps-unet"] = _train_result([0.4, 0.4], fits=False, steps_done=80)
    results["misregistration-crossmodalnet"] = {"status": "ok", "conditions": _dice(
        {"none": 0.85, "shift_2": 0.84, "shift_4": 0.80, "shift_8": 0.7, "warp_2": 0.85, "warp_4": 0.83,
         "warp_8": 0.8})}
    results["misregistration-unet"] = {"status": "ok", "conditions": _dice(
        {"none": 0.65, "shift_2": 0.6, "shift_4": 0.45, "shift_8": 0.3, "warp_2": 0.6, "warp_4": 0.55,
         "warp_8": 0.5})}
    for src, p in (("dropout-crossmodalnet", 0.3), ("budget-crossmodalnet", 0.0)):
        results[f"missing-{src}"] = {"status": "ok", "modality_dropout": p, "supports_missing_modality": p > 0,
                                     "conditions": _dice({"both": 0.8, "ct_only": 0.7, "mr_only": 0.6})}
    return s, jobs, results


def test_plan_has_every_study_and_stable_identities(fabricated) -> None:
    s, jobs, _ = fabricated
    keys = [j["key"] for j in jobs]
    assert keys[:2] == ["budget-crossmodalnet", "budget-unet"]
    assert {"steps-unet", "ablation-attention-paper", "ablation-deformable-off", "ablation-cross-blocks-off",
            "ablation-balancing-on", "dropout-crossmodalnet", "misregistration-unet",
            "missing-dropout-crossmodalnet"} <= set(keys)
    # Evaluations come after the runs they reuse, and carry their identity.
    by_key = {j["key"]: j for j in jobs}
    for j in jobs:
        if "source" in j:
            assert keys.index(j["source"]) < keys.index(j["key"])
            assert j["source_fingerprint"] == by_key[j["source"]]["fingerprint"]
    assert [j["fingerprint"] for j in _plan.plan(s)] == [j["fingerprint"] for j in jobs]
    # The cross-block ablation flips the size's own choice: every stage for `small`, from stage 2 for `tiny`.
    flips = {size: {k: mo for k, _, mo, _ in _plan.ablations(replace(s, model_size=size)) if "cross-" in k}
             for size in ("tiny", "small")}
    assert flips["small"] == {"ablation-cross-blocks-off": {"cross_blocks": False},
                              "ablation-cross-every-stage": {"cross_first_stage": 0}}
    assert flips["tiny"] == {"ablation-cross-blocks-off": {"cross_blocks": False},
                             "ablation-cross-from-stage-2": {"cross_first_stage": 1}}
    longer = _plan.plan(replace(s, minutes=9.0))
    assert longer[0]["fingerprint"] != jobs[0]["fingerprint"]
    steps = by_key["steps-unet"]["config"]
    assert steps["epochs"] * steps["iterations_per_epoch"] == s.steps


def test_tables_rank_and_compare(fabricated) -> None:
    s, jobs, results = fabricated
    table = _report.main_table(jobs, results, "budget", s.edge).splitlines()
    assert table[2].startswith("| crossmodalnet |") and table[3].startswith("| unet |")  # best Dice first
    assert "0.850 ± 0.050" in table[2]
    assert "80/120 (cap)" in _report.main_table(jobs, results, "steps", s.edge)
    text = _report.findings(jobs, results, "budget")
    assert "ranks 1 of 2" in text and "0.200 ± 0.100" in text  # paired: (0.8-0.7, 0.9-0.6)
    assert "-0.300 ± 0.000" in _report.ablation_table(jobs, results)  # per case (0.5-0.8, 0.6-0.9)
    misreg = _report.misregistration_table(s, results)
    assert "ratio 0.25" in misreg  # shift 4: 0.05 lost against 0.20
    assert "ratio 0.20" in misreg  # warp 4: 0.02 against 0.10
    missing = _report.missing_table(s, results)
    assert "| 0.800 | 0.700 | 0.600 | 0.100 | 0.200 |" in missing and "for reference" in missing
    section = _report.report(s, {"splits": {"training": 5, "validation": 1, "test": 2}}, _machine.machine_info(),
                             "cmd", jobs, results, {})
    assert section.count("|---|") >= 5


def test_write_section_replaces_only_its_block(tmp_path: Path) -> None:
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\nkept above\n")
    _files.write_section(md, "compare", "first")
    _files.write_section(md, "latency", "other")
    _files.write_section(md, "compare", "second")
    text = md.read_text()
    assert text.count("<!-- compare:begin -->") == 1 and "second" in text and "first" not in text
    assert "kept above" in text and "other" in text


def test_report_only_runs_nothing(fabricated, tmp_path: Path) -> None:
    _, jobs, _ = fabricated
    results = _runner.run_jobs(jobs, tmp_path, fresh=False, dry_run=False, report_only=True)
    assert {r["status"] for r in results.values()} == {"not run"}
    assert not (tmp_path / "jobs").exists()  # nothing was started


def test_plot_writes_png(fabricated, tmp_path: Path) -> None:
    _, jobs, results = fabricated
    png = _plots.plot_dice(jobs, results, [("budget", "budget")], tmp_path / "dice.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_schedules() -> None:
    epochs, ipe = _schedule.budget_schedule(step_s=2.0, budget_s=480, validations=12)
    assert epochs * ipe >= 1.25 * 480 / 2.0 and abs(epochs - 12) <= 1
    # Slow validation: no more validations than fit in a tenth of the budget, and their time set aside.
    epochs, ipe = _schedule.budget_schedule(step_s=5.0, budget_s=150, validations=12, validation_s=7.0)
    assert epochs == 2 and 1.25 * (150 - 14) / 5.0 <= epochs * ipe < 1.25 * 150 / 5.0
    assert _schedule.sliding_windows(64, 64, 0.25) == 1 and _schedule.sliding_windows(64, 48, 0.25) == 8
    for steps in (1, 7, 10, 150):
        epochs, ipe = _schedule.split_steps(steps, 12)
        assert epochs * ipe == steps


def test_misregistration_perturbations() -> None:
    vol = np.zeros((12, 12, 12), np.float32)
    vol[5, 5, 5] = 1.0
    moved = _perturb.shift_volume(vol, np.array([2.0, 0.0, -1.0]))
    assert np.argwhere(moved == 1.0).tolist() == [[7, 5, 4]]
    assert _perturb.shift_volume(vol, np.zeros(3)) is vol
    assert np.linalg.norm(_perturb.shift_direction(0, 3)) == pytest.approx(1.0)
    field = _perturb.smooth_field((16, 16, 16), seed=0, index=1)
    assert field.shape == (3, 16, 16, 16)
    assert np.linalg.norm(field, axis=0).mean() == pytest.approx(1.0)
    np.testing.assert_array_equal(_perturb.smooth_field((16, 16, 16), 0, 1), field)  # same case, same warp
    warped = _perturb.warp_volume(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), 3 * field)
    assert warped.shape == (16, 16, 16) and warped.dtype == np.float32


def test_draws_pairs_each_folder_and_counts_leads(tmp_path: Path):
    import draws

    def folder(name: str, data_seed: int, train_seed: int, cmn: list[float], unet: list[float], val: tuple) -> Path:
        work = tmp_path / name
        for model, dices, v in (("crossmodalnet", cmn, val[0]), ("unet", unet, val[1])):
            _files.write_json(work / "results" / f"budget-{model}.json", _train_result(dices, best_val_dice=v))
            _files.write_json(work / "jobs" / f"budget-{model}.json",
                         {"dataset": [8, 32, data_seed], "config": {"seed": train_seed}})
        return work

    works = [folder("b", 1, 1, [0.90, 0.92], [0.91, 0.91], (0.80, 0.79)),  # level on test, ahead on val
             folder("a", 0, 0, [0.95, 0.97], [0.94, 0.94], (0.90, 0.88))]  # ahead by 0.02
    for model, shifted in (("crossmodalnet", 0.94), ("unet", 0.90)):  # only folder a has robustness results
        conditions = {"none": {"mean_dice": 0.96}, "shift_4": {"mean_dice": shifted}}
        _files.write_json(works[1] / "results" / f"misregistration-{model}.json",
                          {"status": "ok", "conditions": conditions})
    rows = [draws.read_draw(w, "crossmodalnet", "unet") for w in works]
    assert rows[0]["shift_loss"] is None and rows[1]["shift_loss"] == pytest.approx((0.02, 0.06))
    assert rows[1]["delta"] == pytest.approx([0.01, 0.03])
    text = draws.table(sorted(rows, key=lambda d: d["data_seed"]), "crossmodalnet", "unet")
    assert text.index("| 0 | 0 |") < text.index("| 1 | 1 |")  # ordered by seeds
    assert "| mean of 2 | | 0.9250 (0.8350) | 0.9350 (0.8500) |" in text
    assert "test mean Dice +0.0100" in text
    assert "test: ahead in 1, behind in 0, level (within 0.0005) in 1" in text
    assert "validation: ahead in 2, behind in 0" in text
    assert "| 0.0600 / 0.0200, 0.33 |" in text and "| not run |" in text
    assert "in the 1 draws with it: ratio 0.33 to 0.33." in text
    # A folder whose two runs were made with different seeds is refused, naming it.
    _files.write_json(works[0] / "jobs" / "budget-unet.json", {"dataset": [8, 32, 1], "config": {"seed": 2}})
    with pytest.raises(draws.CrossModalNetError, match="same seeds"):
        draws.read_draw(works[0], "crossmodalnet", "unet")


def test_every_generated_section_of_the_benchmarks_doc_is_marked_at_both_ends():
    # A section whose begin marker is lost (hand edits around it) would be appended again, not replaced.
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    begins = re.findall(r"<!-- (\w+):begin -->", text)
    ends = re.findall(r"<!-- (\w+):end -->", text)
    assert begins == ends and len(set(begins)) == len(begins)
    assert {"latency", "compare", "draws", "adaptation"} <= set(begins)
    for name in begins:
        assert text.index(f"<!-- {name}:begin -->") < text.index(f"<!-- {name}:end -->")


def test_plans_benchmark_measures_the_planned_step(tiny_dataset) -> None:
    """benchmarks/plans.py: the plan of a dataset, one engine step of its patch, time and memory."""
    r = plans.measure(str(tiny_dataset), "crossmodalnet", "tiny", steps=1)
    assert r["patch"] == [32, 32, 32] and r["batch"] >= 2 and r["channels"] == 2 and r["strides"] is None
    assert r["s_per_step"] > 0 and r["peak_mib"] > 0 and "why:" in r["plan"]
    row = plans._row({**r, "s_per_step_3d": 2.5})
    assert row.count("|") == 11 and "| 2.50 |" in row


@pytest.mark.parametrize(("compare", "name", "labels"), [("attention", "crossmodalnet", ["SDPA", "written out"]),
                                                         ("precision", "unet", ["fp32", "bf16"])])
def test_train_step_benchmark_times_both_variants_and_restores_the_package(tiny_dataset, one_thread, compare, name,
                                                                            labels) -> None:
    """benchmarks/train_step.py: the planned step both ways, the package's attention left as it was."""
    import crossmodalnet.models.layers as layers

    written = layers._attention
    r = train_step.measure(str(tiny_dataset), name, compare, steps=1, repeats=1, size="tiny")
    assert r["model"] == name and r["channels"] == 2 and r["patch"] == [32, 32, 32] and r["batch"] >= 2
    assert list(r["times"]) == labels and all(t > 0 for t in r["times"].values())
    timed = {**r, "times": dict(zip(labels, [0.6, 0.4], strict=True))}
    cells = [c.strip() for c in train_step.row(timed).strip("|").split("|")]
    assert cells[1:] == [name, "2", "32x32x32", str(r["batch"]), "0.600", "0.400", "1.50"]
    assert layers._attention is written


@pytest.mark.parametrize("name", ["unet", "crossmodalnet"])
def test_the_schedule_probe_times_a_training_step_and_an_inference_batch(name, one_thread):
    import _train_job

    from crossmodalnet.config import ModelConfig, TrainConfig

    config = TrainConfig(model=ModelConfig.from_size(name, "tiny"), patch_size=(32, 32, 32), batch_size=2,
                         sw_batch_size=2)
    step_s, forward_s = _train_job._probe(config, steps=1)
    assert 0 < forward_s < step_s  # a no-grad forward of 2 windows costs less than a training step of 2

"""CMIF on a tiny model: the layer sequence, the output files and their shapes, CMIF = ΔI, the pair of
channels it is measured between, the CLI."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from crossmodalnet.analysis.cmif import (
    AnalysisCase,
    check_pair,
    information_flow,
    layer_dim,
    layer_features,
    load_analysis_cases,
    measure_cmif,
    plot_cmif,
    summarize_flow,
    untrained_model,
    write_cmif,
)
from crossmodalnet.cli import main
from crossmodalnet.config import ModelConfig, TrainConfig, dump_yaml
from crossmodalnet.data.dataset import load_case, load_dataset
from crossmodalnet.data.preprocess import fit_preprocessor
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.runs import RunFolder, save_weights

BEST, CONFIG, PREPROCESS = RunFolder.WEIGHTS, RunFolder.CONFIG, RunFolder.PREPROCESS

NAMES = ["input", "stem", "stage1", "cross1", "stage2", "cross2", "stage3", "cross3"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(root: Path, data: Path, seed: int = 0, **model: object) -> Path:
    """A run folder in the trainer's format holding an untrained tiny CrossModalNet."""
    cfg = TrainConfig(model=ModelConfig.from_size("crossmodalnet", "tiny", **model), patch_size=(32, 32, 32),
                      device="cpu")
    root.mkdir(parents=True)
    dump_yaml(cfg, root / CONFIG)
    save_weights(untrained_model(cfg.model, seed), root / BEST, cfg.model)
    dataset = load_dataset(data)
    fit_preprocessor([load_case(c, dataset.spec) for c in dataset["training"]], dataset.spec.channels).save(
        root / PREPROCESS)
    return root


@pytest.fixture(scope="module")
def tiny_run(tiny_dataset, tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("cmif") / "run", tiny_dataset)


def test_layer_features_names_shapes_and_padding():
    model = untrained_model(ModelConfig.from_size("crossmodalnet", "tiny"), seed=0)
    image = torch.randn(1, 2, 20, 24, 36, generator=torch.Generator().manual_seed(0))
    feats = layer_features(model, image)  # padded to 32 x 32 x 48 inside, cropped back per layer
    assert [n for n, _, _ in feats] == NAMES
    positions = {n: fa.shape[0] for n, fa, _ in feats}
    assert positions["input"] == 20 * 24 * 36
    assert positions["stem"] == positions["cross1"] == 5 * 6 * 9  # stride 4
    assert positions["stage2"] == 3 * 3 * 5 and positions["cross3"] == 2 * 2 * 3
    assert [fa.shape[1] for _, fa, _ in feats] == [1, 12, 12, 12, 24, 24, 48, 48]
    assert all(fa.shape == fb.shape for _, fa, fb in feats)
    ablation = untrained_model(ModelConfig.from_size("crossmodalnet", "tiny"), seed=0, cross_blocks=False)
    assert [n for n, _, _ in layer_features(ablation, image)] == ["input", "stem", "stage1", "stage2", "stage3"]
    # The input layer is the two channels' voxels.
    assert torch.equal(feats[0][1][:, 0], image[0, 0].reshape(-1)) and torch.equal(feats[0][2][:, 0],
                                                                                      image[0, 1].reshape(-1))


def test_cmif_with_three_channels_is_measured_between_the_chosen_pair():
    model = untrained_model(ModelConfig.from_size("crossmodalnet", "tiny", modalities=3), seed=0)
    image = torch.randn(1, 3, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    first, last = layer_features(model, image), layer_features(model, image, pair=(2, 0))
    assert [n for n, _, _ in first] == NAMES
    assert torch.equal(first[0][1], last[0][2]) and torch.equal(last[0][1][:, 0], image[0, 2].reshape(-1))
    with torch.no_grad():
        *_, layers = model.encode(image, keep_layers=True)
    torch.testing.assert_close(last[3][1], layers[1][1][2].reshape(-1, 12))  # cross1 tokens of channel 2
    case = AnalysisCase("c", image, None)
    flow = information_flow(model, [case], pair=(1, 2))
    assert [row["name"] for row in flow] == NAMES
    with pytest.raises(CrossModalNetError, match="two different channels of 0..2"):
        check_pair(model, (1, 1))
    with pytest.raises(CrossModalNetError, match="two different channels of 0..2"):
        check_pair(model, (0, 3))


def test_cmif_does_not_apply_to_a_single_channel():
    model = untrained_model(ModelConfig.from_size("crossmodalnet", "tiny", modalities=1), seed=0)
    with pytest.raises(CrossModalNetError, match="single channel, so it does not apply"):
        layer_features(model, torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(CrossModalNetError, match="needs a CrossModalNet"):
        check_pair(torch.nn.Linear(2, 2), (0, 1))


def test_layer_dim_shrinks_with_few_positions():
    assert layer_dim(4, 12, 512) == 4
    assert layer_dim(4, 48, 8) == 1  # 8 tokens: one component per stream
    assert layer_dim(4, 48, 7) == 0  # too few to estimate anything
    assert layer_dim(8, 1, 10**5) == 1


def test_flow_and_cmif_on_phantoms(tiny_dataset, tiny_run):
    from crossmodalnet.data.preprocess import Preprocessor

    cases = load_analysis_cases(tiny_dataset, Preprocessor.load(tiny_run / PREPROCESS), cases=2, split="training")
    assert [c.image.shape for c in cases] == [(1, 2, 32, 32, 32)] * 2
    model = untrained_model(ModelConfig.from_size("crossmodalnet", "tiny"), seed=0)
    layers = summarize_flow(information_flow(model, cases, ("gaussian",), pca_dim=4))
    assert [layer["name"] for layer in layers] == NAMES
    assert [layer["depth"] for layer in layers] == list(range(len(NAMES)))
    for prev, layer in zip(layers, layers[1:], strict=False):
        # CMIF(l) per case is I(l) - I(l-1), so its mean is the difference of the means.
        delta = layer["mi_mean"]["gaussian"] - prev["mi_mean"]["gaussian"]
        assert layer["cmif_mean"]["gaussian"] == pytest.approx(delta)
        assert len(layer["cmif"]["gaussian"]) == 2
    # Registered CT and MR of the same anatomy: far from independent at the input.
    assert min(layers[0]["mi"]["gaussian"]) > 0.1


def test_measure_and_write(tiny_dataset, tiny_run, tmp_path):
    results = measure_cmif(tiny_run, tiny_dataset, cases=2, estimators=("gaussian", "ksg"), max_samples=400,
                           split="training")
    assert set(results["models"]) == {"trained", "untrained", "no_cross_blocks"}
    assert results["pair"] == [0, 1] and results["pair_channels"] == ["CT", "MR"]
    assert "untrained" in results["models"]["no_cross_blocks"]["description"]
    trained, untrained, ablation = (results["models"][k]["layers"] for k in ("trained", "untrained", "no_cross_blocks"))
    assert [layer["name"] for layer in ablation] == ["input", "stem", "stage1", "stage2", "stage3"]
    # The input is the same data for every model; the untrained twin and the ablation share their
    # initialisation seed, so their streams agree until the first Cross Transformer block.
    assert trained[0]["mi_mean"] == untrained[0]["mi_mean"] == ablation[0]["mi_mean"]
    assert untrained[2]["mi"]["gaussian"] == ablation[2]["mi"]["gaussian"]
    assert untrained[4]["mi"]["gaussian"] != ablation[3]["mi"]["gaussian"]  # stage2, after cross1 or not
    paths = write_cmif(results, tmp_path)
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * (len(NAMES) + len(NAMES) + 5)  # 2 estimators x layers of the three models
    assert {r["estimator"] for r in rows} == {"gaussian", "ksg"}
    assert all(r["cmif_mean"] == "" for r in rows if r["layer"] == "input")
    data = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["layer0"].startswith("l=0 is 'input'")
    assert paths["plot"].stat().st_size > 10_000


def test_cli_end_to_end(tiny_dataset, tiny_run, tmp_path, capsys):
    out = tmp_path / "cmif"
    assert main(["cmif", str(tiny_run), str(tiny_dataset), "--out", str(out), "--cases", "1",
                 "--estimator", "gaussian", "--pca-dim", "2"]) == 0
    assert {p.name for p in out.iterdir()} == {"cmif.csv", "cmif.json", "cmif.png"}
    data = json.loads((out / "cmif.json").read_text())
    assert data["pca_dim"] == 2 and data["estimators"] == ["gaussian"] and len(data["cases"]) == 1
    assert all(math.isfinite(layer["mi_mean"]["gaussian"]) for layer in data["models"]["trained"]["layers"])
    assert "trained" in capsys.readouterr().out


def test_cli_errors_are_one_line(tiny_dataset, tiny_run, tmp_path, capsys):
    assert main(["cmif", str(tmp_path), str(tiny_dataset), "--out", str(tmp_path / "o")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["cmif", str(tiny_run), str(tiny_dataset), "--out", str(tmp_path / "o"), "--pca-dim", "0"]) == 2
    assert "--pca-dim" in capsys.readouterr().err
    assert main(["cmif", str(tiny_run), str(tiny_dataset), "--out", str(tmp_path / "o"), "--cases", "0"]) == 2
    assert "--cases" in capsys.readouterr().err
    assert main(["cmif", str(tiny_run), str(tiny_dataset), "--out", str(tmp_path / "o"), "--split", "nope"]) == 2
    assert "unknown split" in capsys.readouterr().err


def test_plot_keeps_the_callers_backend(tmp_path):
    """plot_cmif draws on a bare Figure: no switch to Agg, no pyplot figure left open."""
    import matplotlib
    import matplotlib.pyplot as plt

    layers = [{"name": n, "depth": i, "mi_mean": {"gaussian": 0.1 * i}, "mi_std": {"gaussian": 0.01},
               "cmif_mean": {"gaussian": 0.1} if i else {}, "cmif_std": {"gaussian": 0.01} if i else {}}
              for i, n in enumerate(NAMES)]
    results = {"models": {"trained": {"layers": layers}}, "estimators": ["gaussian"], "cases": ["a"], "pca_dim": 4}
    old = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        before = plt.get_fignums()
        path = plot_cmif(results, tmp_path / "cmif.png")
        assert path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 10_000
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == before
    finally:
        matplotlib.use(old)

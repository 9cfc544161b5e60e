"""Weights of the two-stream CrossModalNet (streams `ct`/`mr`, cross directions `a_from_b`/`b_from_a`)
load into the model of one stream per channel with `upgrade_state_dict`, and compute the same thing."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crossmodalnet.config import ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models import build_model, upgrade_state_dict

# The last commit with the two-stream model code.
TWO_STREAM_COMMIT = "306de3d3a680b25f0a5fd497d386493765b95717"
REPO = Path(__file__).resolve().parents[2]


def _config(**overrides) -> ModelConfig:
    return ModelConfig.from_size("crossmodalnet", "tiny", **overrides)


def _old_key(key: str) -> str:
    """Today's key in the two-stream layout: the mapping of `upgrade_state_dict`, run backwards."""
    for new, old in (("streams.0.", "ct."), ("streams.1.", "mr.")):
        if key.startswith(new):
            key = old + key[len(new):]
    return key.replace(".refine.0.", ".a_from_b.").replace(".refine.1.", ".b_from_a.")


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter moved off its initial value, so that a wrong mapping cannot go unnoticed."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def test_upgrade_maps_the_two_stream_keys_and_keeps_the_rest():
    old = {"ct.stem.stages.0.0.weight": 1, "mr.placeholders.0": 2, "cross.1.a_from_b.attn.q.weight": 3,
           "cross.0.b_from_a.deform.offsets.bias": 4, "bottleneck.conv1.conv.weight": 5, "ups.0.up.proj.bias": 6}
    assert upgrade_state_dict("crossmodalnet", old) == {
        "streams.0.stem.stages.0.0.weight": 1, "streams.1.placeholders.0": 2, "cross.1.refine.0.attn.q.weight": 3,
        "cross.0.refine.1.deform.offsets.bias": 4, "bottleneck.conv1.conv.weight": 5, "ups.0.up.proj.bias": 6}
    new = build_model("crossmodalnet", _config()).state_dict()
    assert upgrade_state_dict("crossmodalnet", new) == dict(new)  # today's layout passes through
    unet = build_model("unet", size="tiny").state_dict()
    assert list(upgrade_state_dict("unet", unet)) == list(unet)  # nothing of the baselines moved
    with pytest.raises(CrossModalNetError, match="both the old and the new layout"):
        upgrade_state_dict("crossmodalnet", {"ct.a": 1, "streams.0.a": 2})
    with pytest.raises(CrossModalNetError, match="unknown model"):
        upgrade_state_dict("resnet", {})


@pytest.mark.parametrize("overrides", [{}, dict(fine_skips="both", cross_first_stage=1)])
def test_round_trip_through_the_two_stream_names(overrides):
    torch.manual_seed(0)
    model = _perturbed(build_model("crossmodalnet", _config(**overrides))).eval()
    old = {_old_key(k): v for k, v in model.state_dict().items()}
    assert any(k.startswith("ct.") for k in old) and any(".b_from_a." in k for k in old)
    assert not any(k.startswith("streams.") or ".refine." in k for k in old)
    torch.manual_seed(1)
    fresh = build_model("crossmodalnet", _config(**overrides)).eval()
    fresh.load_state_dict(upgrade_state_dict("crossmodalnet", old), strict=True)
    image = torch.randn(1, 2, 20, 24, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(image), model(image))


def _two_stream_module(tmp_path: Path):
    """The two-stream model code of TWO_STREAM_COMMIT as an importable module, or skip (no git history)."""
    try:
        sources = {name: subprocess.run(["git", "-C", str(REPO), "show", f"{TWO_STREAM_COMMIT}:{path}"],
                                        capture_output=True, text=True, check=True, timeout=30).stdout
                   for name, path in (("legacy_cross_attention", "crossmodalnet/models/cross_attention.py"),
                                      ("legacy_crossmodalnet", "crossmodalnet/models/crossmodalnet.py"))}
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"git history with commit {TWO_STREAM_COMMIT[:7]} is not available")
    sources["legacy_crossmodalnet"] = sources["legacy_crossmodalnet"].replace(
        "from crossmodalnet.models.cross_attention import", "from legacy_cross_attention import")
    for name, text in sources.items():
        (tmp_path / f"{name}.py").write_text(text)
    sys.path.insert(0, str(tmp_path))
    try:
        for name in sources:
            spec = importlib.util.spec_from_file_location(name, tmp_path / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return sys.modules["legacy_crossmodalnet"]
    finally:
        sys.path.remove(str(tmp_path))
        for name in sources:
            sys.modules.pop(name, None)


@pytest.mark.parametrize("overrides", [dict(modality_dropout=0.5), dict(fine_skips="both", cross_attention="paper")])
def test_weights_saved_by_the_two_stream_code_load_and_give_identical_outputs(tmp_path, overrides):
    legacy = _two_stream_module(tmp_path)
    cfg = _config(**overrides).for_data(None)  # the old code reads the fields as they are: none left None
    torch.manual_seed(0)
    old = legacy.CrossModalNet(cfg)
    torch.manual_seed(0)
    new = build_model("crossmodalnet", cfg)
    # Same modules built in the same order: the same seed draws the same weights.
    upgraded = upgrade_state_dict("crossmodalnet", old.state_dict())
    assert list(upgraded) == list(new.state_dict())
    assert all(torch.equal(upgraded[k], v) for k, v in new.state_dict().items())
    old = _perturbed(old)
    new.load_state_dict(upgrade_state_dict("crossmodalnet", old.state_dict()), strict=True)
    gen = torch.Generator().manual_seed(1)
    ct, mr = torch.randn(2, 1, 20, 24, 28, generator=gen), torch.randn(2, 1, 20, 24, 28, generator=gen)
    image = torch.cat([ct, mr], dim=1)
    old.eval(), new.eval()
    with torch.no_grad():
        assert torch.equal(new(image), old(ct, mr))
        assert torch.equal(new(image, torch.tensor([[True, False]] * 2)), old(ct, None))
        assert torch.equal(new(image, torch.tensor([[False, True]] * 2)), old(None, mr))
    # Training with modality dropout: the same draws drop the same channels.
    old.train(), new.train()
    torch.manual_seed(5)
    expected = old(ct.repeat(2, 1, 1, 1, 1), mr.repeat(2, 1, 1, 1, 1))
    torch.manual_seed(5)
    got = new(image.repeat(2, 1, 1, 1, 1))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))

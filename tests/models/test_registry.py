"""The registry: every model built by name, called model(image, present), and one training step each."""

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from crossmodalnet.config import ModelConfig
from crossmodalnet.errors import CrossModalNetError
from crossmodalnet.models import MODEL_NAMES, build_model


def test_registry_lists_crossmodalnet_and_monai_baselines():
    assert set(MODEL_NAMES) >= {"crossmodalnet", "swinunetr", "mednext", "unetr", "unet"}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_training_step_every_model(name):
    torch.manual_seed(0)
    # SwinUNETR's bottleneck is 1/32 of the input: at 32^3 instance norm would see one voxel; one axis
    # of 64 gives it two.
    shape = (64, 32, 32) if name == "swinunetr" else (32, 32, 32)
    cfg = ModelConfig.from_size(name, "tiny", img_size=32)
    model = build_model(name, cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    image = torch.randn(2, 2, *shape)
    target = torch.randint(0, 8, (2, 1, *shape))
    before = [p.detach().clone() for p in model.parameters()]
    out = model(image)
    # Models with deep supervision (CrossModalNet's default) return [full, stride 2, stride 4] in training.
    levels = out if isinstance(out, list) else [out]
    assert [tuple(o.shape) for o in levels] == [(2, 8, *(e // f for e in shape)) for f in (1, 2, 4)][: len(levels)]
    loss = sum(DiceCELoss(to_onehot_y=True, softmax=True)(o, F.interpolate(target.float(), size=o.shape[2:]))
               for o in levels)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert changed > 0.5 * len(before)


@pytest.mark.parametrize("name", ["swinunetr", "mednext", "unet"])
def test_baselines_accept_any_size(name):
    model = build_model(name, size="tiny").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 2, 21, 18, 35), torch.tensor([[True, False]]))
    assert out.shape == (1, 8, 21, 18, 35)


@pytest.mark.parametrize("modalities", [1, 3, 4])
def test_baselines_stack_every_channel_and_zero_the_missing_ones(modalities):
    torch.manual_seed(0)
    model = build_model("unet", ModelConfig.from_size("unet", "tiny", modalities=modalities)).eval()
    assert model.net.model[0].conv.unit0.conv.in_channels == modalities  # early fusion: one input per channel
    image = torch.randn(2, modalities, 16, 16, 16)
    present = torch.ones(2, modalities, dtype=torch.bool)
    present[1, -1] = modalities == 1  # sample 1 lacks its last channel (a single channel is never missing)
    zeroed = image.clone()
    zeroed[1, -1] = 0 if modalities > 1 else zeroed[1, -1]
    with torch.no_grad():
        out = model(image, present)
        assert torch.equal(out, model(zeroed))  # what the caller left in a missing channel does not matter
    assert out.shape == (2, 8, 16, 16, 16)
    with pytest.raises(ValueError, match=f"image must be \\(B, {modalities}, D, H, W\\)"):
        model(torch.randn(1, modalities + 1, 16, 16, 16))
    with pytest.raises(ValueError, match="at least one present channel"):
        model(image, torch.zeros(2, modalities, dtype=torch.bool))


def test_unknown_names_and_mismatched_config_are_refused():
    with pytest.raises(CrossModalNetError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(CrossModalNetError, match="not 'unet'"):
        build_model("unet", ModelConfig.from_size("crossmodalnet", "tiny"))
    with pytest.raises(CrossModalNetError, match="unknown size"):
        build_model("unet", size="huge")


def test_forward_flops_counts_fused_cpu_attention_and_convolutions():
    from crossmodalnet.models.registry import forward_flops

    class Attn(torch.nn.Module):
        def forward(self, image, present=None):  # (1, 1, 8, 8, 8) -> tokens (1, 1, 64, 8); mask forces the fused kernel
            q = image.reshape(1, 1, 64, 8)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 64, 64))

    assert forward_flops(Attn(), edge=8) == 2 * 64 * 64 * (8 + 8)

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 4, 3, padding=1, bias=False)

        def forward(self, image, present=None):
            return self.conv(image)

    assert forward_flops(Conv(), edge=8, channels=2) == 2 * 8**3 * 27 * 2 * 4
    # Without `channels`, the model's own: modalities x in_channels of its config.
    cmn = build_model("crossmodalnet", ModelConfig.from_size("crossmodalnet", "tiny", modalities=3))
    assert forward_flops(cmn, edge=32) > forward_flops(build_model("crossmodalnet", size="tiny"), edge=32)


def _forward(name: str, cfg: ModelConfig, edge: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, cfg).train()  # training mode: the per-sample norms refuse one voxel there too
    x = torch.randn(1, 1, edge, edge, edge)
    with torch.no_grad():
        out = model(x.repeat(1, 2, 1, 1, 1))
    first = out[0] if isinstance(out, list) else out
    assert first.shape == (1, 8, edge, edge, edge)


# The smallest edges, per model, at tiny and small: 16 + 1 where inputs pad to 16 and a per-sample norm
# runs at stride 16, 32 + 1 for SwinUNETR (stride 32), 1 where nothing needs more than one voxel.
_MIN_EDGE = {
    "tiny": {"crossmodalnet": 17, "swinunetr": 33, "mednext": 17, "unetr": 1, "unet": 1, "dynunet": 17, "nnformer": 1,
             "vtunet": 1, "swinunet": 1},
    "small": {"crossmodalnet": 17, "swinunetr": 33, "mednext": 17, "unetr": 1, "unet": 17, "dynunet": 17,
              "nnformer": 1, "vtunet": 1, "swinunet": 1},
}


def test_min_input_edge_of_every_model_at_tiny_and_small():
    from crossmodalnet.models.registry import min_input_edge

    assert set(_MIN_EDGE["tiny"]) == set(MODEL_NAMES)
    for size, expected in _MIN_EDGE.items():
        got = {name: min_input_edge(ModelConfig.from_size(name, size, img_size=32)) for name in MODEL_NAMES}
        assert got == expected, size


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_smallest_accepted_edge_runs_and_one_below_is_refused(name):
    from crossmodalnet.models.registry import check_input_size, min_input_edge

    cfg = ModelConfig.from_size(name, "tiny", img_size=32)
    edge = min_input_edge(cfg)
    check_input_size(cfg, (edge, edge, edge))
    _forward(name, cfg, edge)
    below = edge - 1
    if below >= 1:  # one axis at the smallest edge is enough: the deepest norm then holds two voxels
        check_input_size(cfg, (below, edge, below))
    with pytest.raises(CrossModalNetError) as err:
        check_input_size(cfg, (below, below, below))
    msg = str(err.value)
    assert msg == f"model {name} (tiny) needs inputs of at least {edge} voxels on one axis, got {[below] * 3}"
    assert "\n" not in msg
    if below >= 1:  # the rule is tight: the model itself fails one voxel below (a per-sample norm on one voxel)
        with pytest.raises(ValueError, match="more than 1"):
            _forward(name, cfg, below)


def test_unetr_has_a_largest_edge_and_an_img_size_multiple_of_16():
    from crossmodalnet.models.registry import check_input_size, input_size_rule

    cfg = ModelConfig.from_size("unetr", "tiny", img_size=32)
    assert input_size_rule(cfg).max_edge == 32
    with pytest.raises(CrossModalNetError, match=r"^model unetr \(tiny\) needs inputs of at most 32 voxels per axis "
                                                 r"\(its img_size\), got 33 on axis 2$"):
        check_input_size(cfg, (32, 32, 33))
    with pytest.raises(CrossModalNetError, match="needs img_size a multiple of 16, got 40"):
        check_input_size(ModelConfig.from_size("unetr", "tiny", img_size=40), (32, 32, 32))


def test_models_command_lists_models_that_fit_and_says_what_the_others_need(capsys, monkeypatch):
    import crossmodalnet.models.registry as registry
    from crossmodalnet.cli import main

    # Counting FLOPs is not what is tested here (and is the slow part): 2.5 GFLOPs for every model that runs.
    monkeypatch.setattr(registry, "forward_flops", lambda model, edge, batch=1: 2.5e9)
    assert main(["models", "--size", "32", "--model-size", "tiny"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]}
    assert set(rows) == set(MODEL_NAMES)
    # SwinUNETR's stride-32 instance norm would see one voxel: its row says so instead of a traceback.
    assert rows["swinunetr"][3] == "needs >= 33 voxels per axis"
    for name in set(MODEL_NAMES) - {"swinunetr"}:
        assert rows[name][3] == "2.5", name

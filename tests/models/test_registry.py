"""The registry: every model built by name, called model(ct, mr), and one training step each."""

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
    # SwinUNETR's bottleneck is 1/32 of the input: at 32^3 instance norm would see one voxel.
    s = 64 if name == "swinunetr" else 32
    cfg = ModelConfig.from_size(name, "tiny", img_size=s)
    model = build_model(name, cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ct, mr = torch.randn(2, 1, s, s, s), torch.randn(2, 1, s, s, s)
    target = torch.randint(0, 8, (2, 1, s, s, s))
    before = [p.detach().clone() for p in model.parameters()]
    out = model(ct, mr)
    # Models with deep supervision (CrossModalNet's default) return [full, stride 2, stride 4] in training.
    levels = out if isinstance(out, list) else [out]
    assert [tuple(o.shape) for o in levels] == [(2, 8, s // f, s // f, s // f) for f in (1, 2, 4)][: len(levels)]
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
        out = model(torch.randn(1, 1, 21, 18, 35), None)
    assert out.shape == (1, 8, 21, 18, 35)


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
        def forward(self, ct, mr):  # (1, 1, 8, 8, 8) -> tokens (1, 1, 64, 8); mask forces the fused CPU kernel
            q = ct.reshape(1, 1, 64, 8)
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 64, 64))

    assert forward_flops(Attn(), edge=8) == 2 * 64 * 64 * (8 + 8)

    class Conv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(2, 4, 3, padding=1, bias=False)

        def forward(self, ct, mr):
            return self.conv(torch.cat([ct, mr], 1))

    assert forward_flops(Conv(), edge=8) == 2 * 8**3 * 27 * 2 * 4

"""Sliding-window probabilities of whole volumes: image (B, M, D, H, W) with a presence row per sample."""

import pytest
import torch

from crossmodalnet.config import ModelConfig
from crossmodalnet.models import build_model
from crossmodalnet.models.inference import sliding_window_probabilities

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(modalities=3):
    torch.manual_seed(0)
    return build_model("crossmodalnet", ModelConfig.from_size("crossmodalnet", "tiny", modalities=modalities)).eval()


def test_each_sample_is_predicted_with_its_own_channels():
    model = _model()
    image = torch.randn(2, 3, 40, 20, 20, generator=torch.Generator().manual_seed(0))
    present = torch.tensor([[True, True, True], [False, True, True]])
    probs = sliding_window_probabilities(model, image, present, (32, 32, 32), sw_batch_size=4, precision="fp32")
    assert probs.shape == (2, 8, 40, 20, 20) and probs.dtype == torch.float32 and probs.device.type == "cpu"
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 40, 20, 20))
    alone = [sliding_window_probabilities(model, image[i: i + 1], present[i: i + 1], (32, 32, 32), sw_batch_size=4,
                                          precision="fp32") for i in range(2)]
    torch.testing.assert_close(probs, torch.cat(alone))
    # None is every channel present; sample 1 without channel 0 is another prediction.
    torch.testing.assert_close(alone[0], sliding_window_probabilities(model, image[:1], None, (32, 32, 32),
                                                                      precision="fp32"))
    full = sliding_window_probabilities(model, image[1:], None, (32, 32, 32), precision="fp32")
    assert (full - alone[1]).abs().max() > 1e-4


def test_bad_presence_is_refused():
    model = _model(2)
    image = torch.randn(1, 2, 16, 16, 16)
    with pytest.raises(ValueError, match="at least one present channel"):
        sliding_window_probabilities(model, image, torch.tensor([[False, False]]), (16, 16, 16))
    with pytest.raises(ValueError, match=r"present must be \(B, M\)"):
        sliding_window_probabilities(model, image, torch.tensor([True, True]), (16, 16, 16))
    with pytest.raises(ValueError, match=r"image must be \(B, M, D, H, W\)"):
        sliding_window_probabilities(model, image[0], None, (16, 16, 16))

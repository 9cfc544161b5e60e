"""Sliding-window probabilities of whole volumes: image (B, M, D, H, W) with a presence row per sample."""

import numpy as np
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


def test_keep_largest_foreground_removes_far_islands_and_keeps_touching_structures():
    from crossmodalnet.models.inference import keep_largest_foreground

    label = np.zeros((12, 12, 6), dtype=np.uint8)
    label[1:5, 1:5, 1:4] = 3  # 48 voxels of one class ...
    label[5:7, 1:5, 1:4] = 5  # ... touching 24 of another: one component of 72
    label[7, 5, 4] = 2  # touches the corner of class 5 only diagonally: part of it (26-connected)
    label[10:12, 10:12, 0:2] = 3  # 8 voxels far away: removed
    label[0, 11, 5] = 7  # one voxel far away: removed
    out = keep_largest_foreground(label)
    assert out.dtype == label.dtype and out.shape == label.shape and out is not label
    expected = label.copy()
    expected[10:12, 10:12, 0:2], expected[0, 11, 5] = 0, 0
    np.testing.assert_array_equal(out, expected)
    assert label[10, 10, 0] == 3  # the input is not changed
    single = np.where(expected > 0, expected, 0)
    np.testing.assert_array_equal(keep_largest_foreground(single), single)  # one component: unchanged
    empty = np.zeros((4, 4, 4), dtype=np.int64)
    np.testing.assert_array_equal(keep_largest_foreground(empty), empty)

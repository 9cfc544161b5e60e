"""The evaluator's plots: PNG bytes drawn on a bare Figure, leaving the caller's backend and figures alone."""

import matplotlib
import numpy as np

from crossmodalnet.data.spec import MMWHS
from crossmodalnet.evaluate import evaluate_arrays
from crossmodalnet.evaluate.plots import plot_dice, plot_hd95


def _rows():
    ref = np.zeros((16, 16, 16), np.uint8)
    for k in range(1, 8):
        ref[2 * k - 1:2 * k + 1, 3:13, 3:13] = k
    pred = ref.copy()
    pred[:, 3, :] = 0
    return evaluate_arrays({"a": (pred, ref, (1.0, 1.0, 1.0)), "b": (ref, ref, (1.0, 1.0, 1.0))}, MMWHS)


def test_plots_are_png_and_keep_the_callers_backend():
    rows, summary = _rows()
    old = matplotlib.get_backend()
    matplotlib.use("svg")  # what a user may have chosen; the evaluator must not switch it to Agg
    try:
        import matplotlib.pyplot as plt

        mine = plt.figure()
        for png in (plot_hd95(rows, summary, MMWHS), plot_dice(rows, summary, MMWHS)):
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == [mine.number]  # the caller's figure is still open, no new one
        plt.close(mine)
    finally:
        matplotlib.use(old)

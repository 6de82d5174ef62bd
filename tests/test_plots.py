"""The figures: laid out so that people can read them."""

import numpy as np
import pytest
import torch

import plots


def labelled_ticks(fig):
    """(text, window extent) of every drawn, non-empty y tick label of the curve's axes."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[-1]
    ticks = ax.yaxis.get_major_ticks() + ax.yaxis.get_minor_ticks()
    lo, hi = ax.get_ylim()
    return [(t.label1.get_text(), t.label1.get_window_extent(renderer)) for t in ticks
            if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi]


@pytest.mark.parametrize("lo, hi", [(0.01, 0.9), (0.002, 0.6), (0.021, 0.034), (0.05, 0.3)])
def test_progress_curve_tick_labels_do_not_overlap(lo, hi, tmp_path, monkeypatch):
    """Before: every minor tick of the log axis was labelled, and a curve over two decades wrote
    18 labels into 1.6 inches."""
    kept = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path, tight=False: kept.setdefault("fig", fig))
    steps = list(range(0, 100, 10))
    images = [torch.rand(1, 3, 16, 16) for _ in steps]
    plots.plot_progress(str(tmp_path / "p.png"), steps, images, steps, list(np.geomspace(hi, lo, len(steps))))
    labels = labelled_ticks(kept["fig"])
    assert len(labels) >= 1
    boxes = sorted((b.y0, b.y1) for _, b in labels)
    for (_, top), (bottom, _) in zip(boxes, boxes[1:]):
        assert bottom >= top, [t for t, _ in labels]

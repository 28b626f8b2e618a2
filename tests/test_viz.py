"""peftlab.viz: every plot draws, labels its axes, and returns what it says."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.text import Text

from peftlab import viz

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_heatmap_signed_is_centred_at_zero_and_labelled():
    M = torch.tensor([[1.0, -3.0], [0.5, 2.0]])
    ax = viz.heatmap(M, title="M", annotate=True)
    assert isinstance(ax, Axes)
    assert ax.get_title() == "M"
    assert ax.get_xlabel() and ax.get_ylabel()
    norm = ax.images[0].norm
    assert isinstance(norm, TwoSlopeNorm)
    assert norm.vmin == -3.0 and norm.vmax == 3.0 and norm.vcenter == 0.0
    assert [t.get_text() for t in ax.texts] == ["1", "-3", "0.5", "2"]


def test_heatmap_unsigned_blocks_and_existing_ax():
    fig, ax = plt.subplots()
    out = viz.heatmap(np.arange(16.0).reshape(4, 4), ax=ax, signed=False, blocks=(2, 2))
    assert out is ax
    assert ax.images[0].norm.vmin == 0.0 and ax.images[0].norm.vmax == 15.0
    assert len(ax.lines) == 2  # one horizontal and one vertical block boundary


def test_heatmap_rejects_3d():
    with pytest.raises(ValueError, match="2-D"):
        viz.heatmap(np.zeros((2, 2, 2)))


def test_heatmaps_row_with_titles_and_shared_scale():
    fig = viz.heatmaps([np.eye(2), -2 * np.eye(3)], titles=["A", "B"], shared_scale=True)
    assert isinstance(fig, Figure)
    axes = [a for a in fig.axes if a.images]
    assert [a.get_title() for a in axes] == ["A", "B"]
    assert all(a.images[0].norm.vmax == 2.0 for a in axes)
    with pytest.raises(ValueError, match="titles"):
        viz.heatmaps([np.eye(2)], titles=["a", "b"])


def test_spectrum_from_matrix_values_and_dict():
    ax = viz.spectrum(torch.diag(torch.tensor([3.0, 2.0, 0.0])), label="diag")
    assert isinstance(ax, Axes)
    assert ax.get_yscale() == "log"
    y = ax.lines[0].get_ydata()
    assert y[0] == pytest.approx(3.0) and y[1] == pytest.approx(2.0) and 0 < y[2] < 2.0  # zero clipped
    assert "singular value" in ax.get_ylabel() and "index" in ax.get_xlabel()
    ax2 = viz.spectrum({"a": [4.0, 2.0, 1.0], "b": np.eye(3)}, normalise=True, log=False)
    assert len(ax2.lines) == 2
    assert ax2.lines[0].get_ydata()[0] == pytest.approx(1.0)
    assert [t.get_text() for t in ax2.get_legend().get_texts()] == ["a", "b"]
    ax3 = viz.spectrum([np.eye(2), 2 * np.eye(3)], label=["I2", "2·I3"])
    assert len(ax3.lines) == 2


def test_curves_lists_pairs_history_and_smoothing():
    class History:
        loss = [3.0, 2.0, 1.0, 0.5]

    ax = viz.curves(
        {"list": [1.0, 0.5, 0.25], "pairs": [(0, 1.0), (10, 0.3)], "xy": ([0, 5], [2.0, 1.0]), "hist": History()},
        ylabel="loss (nats)",
    )
    assert ax.get_xlabel() == "step" and ax.get_ylabel() == "loss (nats)"
    assert len(ax.lines) == 4
    assert list(ax.lines[1].get_xdata()) == [0, 10]
    ax2 = viz.curves({"s": np.array([0.0, 2.0, 4.0])}, smooth=2)
    assert len(ax2.lines) == 2  # raw (faint) + smoothed
    np.testing.assert_allclose(ax2.lines[1].get_ydata(), [0.0, 1.0, 3.0])
    assert ax.get_legend() is not None and [t.get_text() for t in ax.get_legend().get_texts()][0] == "list"
    bare = viz.curves({"a": [1.0, 2.0], "b": [2.0, 1.0]}, legend=False)  # a row of panels shares one legend
    assert bare.get_legend() is None and bare.get_legend_handles_labels()[1] == ["a", "b"]
    outside = viz.curves({"a": [1.0, 2.0], "b": [2.0, 1.0]}, legend="outside")  # right of the box, clear of the curves
    outside.figure.canvas.draw()
    box, axes_box = outside.get_legend().get_window_extent(), outside.get_window_extent()
    assert box.x0 >= axes_box.x1
    with pytest.raises(ValueError, match="legend='right'.*'outside'"):
        viz.curves({"a": [1.0]}, legend="right")


def test_bars_counts_labelled():
    ax = viz.bars({"LoRA r=4": 4392, "full": 85002}, log=True)
    assert isinstance(ax, Axes)
    assert ax.get_ylabel() == "parameters" and ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["LoRA r=4", "full"]
    assert [t.get_text() for t in ax.texts] == ["4,392", "85,002"]
    with pytest.raises(ValueError):
        viz.bars({})


def test_spectrum_keeps_float64_precision_and_labels_threshold():
    ax = viz.spectrum(torch.diag(torch.tensor([1.0, 1e-15], dtype=torch.float64)), threshold=1e-10,
                      threshold_label="rank cut-off")
    assert ax.lines[0].get_ydata()[1] == pytest.approx(1e-15)  # not float32 noise
    assert "rank cut-off" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_heatmap_colorbar_label():
    ax = viz.heatmap(np.eye(2), signed=False, colorbar_label="rank")
    assert ax.figure.axes[-1].get_ylabel() == "rank"


@pytest.mark.parametrize("method", sorted(viz.METHOD_DIAGRAMS))
def test_method_diagram_draws_every_known_method(method):
    ax = viz.method_diagram(method)
    spec = viz.METHOD_DIAGRAMS[method]
    texts = [t.get_text() for t in ax.texts]
    # every block's label is drawn, with x at the bottom and h at the top, and the equation underneath
    for block in spec.main + tuple(b for branch in spec.branches for b in branch):
        assert block.label in texts, (method, block.label)
    assert "$x$" in texts and "$h$" in texts and spec.equation in texts
    ys = {t.get_text(): t.get_position()[1] for t in ax.texts}
    assert ys["$x$"] < ys["$h$"]
    # trained and frozen parts are told apart by colour, and the legend says which is which
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["frozen (pretrained)", "trained (the adapter)"]
    ax.figure.canvas.draw()  # mathtext must parse


def test_method_diagram_takes_a_new_spec_and_rejects_unknown_names():
    spec = viz.MethodDiagram("toy: a scaled detour", main=(viz.Block("$W_0$", kind="frozen"),),
                             branches=((viz.Block("$v$"),),), equation="$h = W_0 x + v$")
    ax = viz.method_diagram(spec)
    assert "$v$" in [t.get_text() for t in ax.texts]
    with pytest.raises(KeyError, match="known:.*lora"):
        viz.method_diagram("vera")
    with pytest.raises(ValueError, match="main path"):
        viz.method_diagram(viz.MethodDiagram("empty", main=()))


def test_pareto_front_keeps_undominated_points():
    # (cost, score): b beats a (cheaper, better); c costs more but scores best; d is dominated by b
    assert viz.pareto_front([10, 5, 20, 6], [80, 85, 90, 84]) == [1, 2]
    assert viz.pareto_front([1, 1], [2, 2]) == [0, 1]  # ties dominate neither
    with pytest.raises(ValueError):
        viz.pareto_front([1], [1, 2])


def test_pareto_plot_marks_front_and_labels():
    ax = viz.pareto({"LoRA": (100, 90.0), "IA3": (10, 50.0), "full": (1000, 89.0)}, spread={"LoRA": 1.0},
                    xlabel="trainable parameters", ylabel="accuracy (%)")
    assert ax.get_xscale() == "log" and ax.get_ylabel() == "accuracy (%)"
    assert sorted(t.get_text() for t in ax.texts) == ["IA3", "LoRA", "full"]
    front = [line for line in ax.lines if line.get_label() == "Pareto front"][0]
    assert list(front.get_xdata()) == [10.0, 100.0]  # "full" is dominated by LoRA
    with pytest.raises(ValueError):
        viz.pareto({})


def test_pareto_labels_do_not_overlap_in_a_cluster():
    """Nine methods within a few parameters and points of each other (as in the method comparison): each label in
    its marker's colour, no two labels overlapping, none on the legend; labels pushed out of the crowd are joined
    to their marker by a line."""
    names = [f"method {k}" for k in range(9)]
    pts = {n: (4000 + 30 * k, 97.0 + 0.2 * (k % 4)) for k, n in enumerate(names)}
    pts["far"] = (20000, 80.0)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_xlim(1000, 100000)  # "far" in the open, away from the frame and the legend
    ax.set_ylim(0, 100)
    viz.pareto(pts, ax)
    fig.canvas.draw()  # places each annotation's text where it will be drawn
    renderer = fig.canvas.get_renderer()
    labels = {t.get_text(): t for t in ax.texts}
    assert sorted(labels) == sorted(pts)  # one label per point, the placement probes gone
    boxes = {n: Text.get_window_extent(t, renderer) for n, t in labels.items()}  # the text, not its line
    for a in boxes:
        for b in boxes:
            assert a == b or not boxes[a].overlaps(boxes[b]), (a, b)
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(box.overlaps(legend) for box in boxes.values())
    assert labels["method 0"].get_color() == viz.COLORS[0]
    assert labels["far"].get_color() == viz.COLORS[9 % len(viz.COLORS)]
    assert labels["far"].arrow_patch is None  # alone: beside its marker, no line
    assert any(labels[n].arrow_patch is not None for n in names)  # nine in a crowd: some pushed out, with lines
    plt.close(fig)

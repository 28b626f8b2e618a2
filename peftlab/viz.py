"""One look for every plot in the book: heatmaps, spectra, curves and parameter bars.

Every function draws on a given ``ax`` (or makes one), labels its axes with what is shown
and in which unit, and returns the matplotlib ``Axes`` (``heatmaps`` returns the ``Figure``).
Importing the module applies the book's style (:func:`set_style`); it never chooses a
backend, so it works under Agg (tests, CI) as in a notebook.

Explained in: book/products.ipynb
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import matplotlib as mpl
import matplotlib.patches  # noqa: F401  (mpl.patches for the method diagrams)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from matplotlib.ticker import MaxNLocator

ArrayLike = Any  # torch.Tensor, numpy array, nested lists, sympy Matrix of numbers

# Diverging map centred at 0 for signed matrices (weights, deltas), sequential otherwise.
SIGNED_CMAP = "RdBu_r"
UNSIGNED_CMAP = "viridis"
# Line colours, in order (matplotlib's "tab10").
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]

STYLE: dict[str, Any] = {
    "figure.figsize": (5.0, 3.4),
    "figure.dpi": 100,
    "savefig.dpi": 150,
    "figure.constrained_layout.use": True,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linestyle": "-",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": mpl.cycler(color=COLORS),
    "lines.linewidth": 1.6,
    "image.cmap": UNSIGNED_CMAP,
}


def set_style() -> None:
    """Apply the book's plotting style to matplotlib's global settings.

    Explained in: book/products.ipynb
    """
    mpl.rcParams.update(STYLE)


set_style()


def _to_numpy(M: ArrayLike) -> np.ndarray:
    """A float numpy copy of a tensor / array / nested list (detached, on CPU)."""
    if hasattr(M, "detach"):  # torch.Tensor; float64 keeps tiny singular values visible
        M = M.detach().to("cpu").double().numpy()
    return np.asarray(M, dtype=float)


def _new_ax(ax: Optional[Axes], figsize: Optional[tuple[float, float]] = None) -> Axes:
    if ax is not None:
        return ax
    _, ax = plt.subplots(figsize=figsize)
    return ax


# ----------------------------------------------------------------------------- heatmaps


def heatmap(
    M: ArrayLike,
    ax: Optional[Axes] = None,
    title: Optional[str] = None,
    signed: bool = True,
    annotate: bool = False,
    *,
    vmax: Optional[float] = None,
    blocks: Optional[tuple[int, int]] = None,
    colorbar: bool = True,
    xlabel: str = "column j",
    ylabel: str = "row i",
    fmt: str = "{:.2g}",
    colorbar_label: str = "value",
) -> Axes:
    """Draw a matrix as coloured cells, row i down and column j across.

    ``signed=True`` uses a diverging map centred at 0 (blue < 0 < red) with a symmetric
    range ±``vmax`` (default max |M|); ``signed=False`` a sequential map. ``annotate``
    writes each value in its cell (for small matrices); ``blocks=(p, q)`` draws lines every
    p rows and q columns, e.g. the p×q blocks a_ij·B of a Kronecker product A ⊗ B.
    ``fmt`` formats the annotations; ``colorbar_label`` names what the colours measure.

    Explained in: book/products.ipynb
    """
    X = _to_numpy(M)
    if X.ndim == 1:
        X = X[None, :]
    if X.ndim != 2:
        raise ValueError(f"heatmap needs a matrix (2-D), got shape {tuple(X.shape)}")
    ax = _new_ax(ax)
    finite = X[np.isfinite(X)]
    if signed:
        vm = float(vmax) if vmax is not None else (float(np.abs(finite).max()) if finite.size else 1.0)
        vm = vm if vm > 0 else 1.0
        norm: Normalize = TwoSlopeNorm(vcenter=0.0, vmin=-vm, vmax=vm)
        cmap = SIGNED_CMAP
    else:
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
        norm = Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)
        cmap = UNSIGNED_CMAP
    im = ax.imshow(X, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    ax.grid(False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    rows, cols = X.shape
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(cols, 8)))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(rows, 8)))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    if blocks is not None:
        p, q = blocks
        for r in range(p, rows, p):
            ax.axhline(r - 0.5, color="black", linewidth=1.2)
        for c in range(q, cols, q):
            ax.axvline(c - 0.5, color="black", linewidth=1.2)
    if annotate:
        for i in range(rows):
            for j in range(cols):
                v = X[i, j] + 0.0  # + 0.0 turns -0.0 into 0.0
                # dark cells get white text
                rgba = im.cmap(im.norm(v))
                light = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] > 0.5
                ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                        color="black" if light else "white")
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.8, label=colorbar_label)
    return ax


def heatmaps(
    Ms: Sequence[ArrayLike],
    titles: Optional[Sequence[str]] = None,
    signed: bool = True,
    annotate: bool = False,
    *,
    shared_scale: bool = False,
    blocks: Optional[Sequence[Optional[tuple[int, int]]]] = None,
    size: float = 2.8,
    suptitle: Optional[str] = None,
) -> Figure:
    """Draw several matrices side by side in one row (one colour bar each, or a shared scale).

    Explained in: book/products.ipynb
    """
    Ms = list(Ms)
    if not Ms:
        raise ValueError("heatmaps needs at least one matrix")
    if titles is not None and len(titles) != len(Ms):
        raise ValueError(f"got {len(Ms)} matrices but {len(titles)} titles")
    if blocks is not None and len(blocks) != len(Ms):
        raise ValueError(f"got {len(Ms)} matrices but {len(blocks)} block specs")
    vmax = None
    if shared_scale:
        vmax = max(float(np.abs(_to_numpy(M)).max()) for M in Ms) or 1.0
    fig, axes = plt.subplots(1, len(Ms), figsize=(size * len(Ms) + 0.6, size), squeeze=False)
    for k, (M, ax) in enumerate(zip(Ms, axes[0])):
        heatmap(
            M,
            ax=ax,
            title=None if titles is None else titles[k],
            signed=signed,
            annotate=annotate,
            vmax=vmax,
            blocks=None if blocks is None else blocks[k],
            colorbar=not shared_scale,
            ylabel="row i" if k == 0 else "",
        )
    if shared_scale:
        fig.colorbar(axes[0][-1].images[0], ax=list(axes[0]), shrink=0.8, label="value")
    if suptitle:
        fig.suptitle(suptitle)
    return fig


# ----------------------------------------------------------------------------- spectra


def _singular_values(x: ArrayLike) -> np.ndarray:
    X = _to_numpy(x)
    if X.ndim == 2:
        return np.linalg.svd(X, compute_uv=False)
    if X.ndim == 1:
        return np.sort(np.abs(X))[::-1]
    raise ValueError(f"spectrum needs singular values (1-D) or a matrix (2-D), got shape {X.shape}")


def spectrum(
    values: Union[ArrayLike, Mapping[str, ArrayLike], Sequence[ArrayLike]],
    ax: Optional[Axes] = None,
    label: Optional[Union[str, Sequence[str]]] = None,
    log: bool = True,
    normalise: bool = False,
    *,
    threshold: Optional[float] = None,
    threshold_label: str = "threshold",
    marker: str = "o",
) -> Axes:
    """Plot singular-value spectra σ_1 ≥ σ_2 ≥ … against their index k.

    ``values`` is one matrix or one vector of singular values, a list of them, or a dict
    name → matrix/values (the names become the legend). ``normalise`` divides each
    spectrum by its σ_1; ``log`` uses a log y-axis (zeros are clipped to the smallest
    positive value shown); ``threshold`` draws a horizontal line (legend ``threshold_label``),
    e.g. the cut-off of a numerical rank.

    Explained in: book/products.ipynb
    """
    if isinstance(values, Mapping):
        names: list[Optional[str]] = list(values.keys())
        items = list(values.values())
    elif isinstance(values, (list, tuple)) and values and _is_matrix_or_vector(values[0]):
        items = list(values)
        if label is None or isinstance(label, str):
            names = [label] + [None] * (len(items) - 1) if label else [None] * len(items)
        else:
            names = list(label)
    else:
        items = [values]
        names = [label if isinstance(label, str) or label is None else label[0]]
    ax = _new_ax(ax)
    floor = None
    for name, item in zip(names, items):
        s = _singular_values(item)
        if normalise and s.size and s[0] > 0:
            s = s / s[0]
        if log:
            pos = s[s > 0]
            tiny = pos.min() * 1e-1 if pos.size else 1e-16
            floor = tiny if floor is None else min(floor, tiny)
            s = np.where(s > 0, s, tiny)
        k = np.arange(1, s.size + 1)
        ax.plot(k, s, marker=marker, markersize=3 if s.size > 20 else 5, label=name)
    if threshold is not None:
        ax.axhline(threshold, color="grey", linestyle="--", linewidth=1, label=threshold_label)
    if log:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("index k (largest first)")
    ax.set_ylabel("σ_k / σ_1" if normalise else "singular value σ_k")
    if any(n for n in names) or threshold is not None:
        ax.legend()
    return ax


def _is_matrix_or_vector(x: Any) -> bool:
    return hasattr(x, "shape") or (isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], (list, tuple)))


# ----------------------------------------------------------------------------- the ΔW gallery


def _delta_spectrum(ax: Axes, delta: ArrayLike, reference: Optional[ArrayLike], floor: float) -> None:
    series = {"this update": delta}
    if reference is not None:
        series["full FT"] = reference
    spectrum(series, ax=ax, normalise=True, marker="")
    lines = ax.get_lines()
    if reference is not None and len(lines) > 1:
        lines[1].set(color="grey", linestyle="--", linewidth=1)
        ax.legend()
    ax.set_xscale("log")  # a low rank shows as a cliff near the left edge
    ax.set_ylim(floor, 2.0)


def delta_gallery(
    deltas: Mapping[str, ArrayLike],
    *,
    reference: Optional[ArrayLike] = None,
    zoom: Optional[int] = 48,
    ncols: int = 5,
    size: float = 2.4,
    floor: float = 1e-8,
    suptitle: Optional[str] = None,
) -> Figure:
    """Weight updates side by side: one column per method, ΔW as a heatmap above its spectrum σ_k / σ_1.

    ``deltas``: label → ΔW (out × in), laid out ``ncols`` methods per row (each method a heatmap over its
    spectrum, so 2·ceil(n / ncols) rows of axes). The heatmaps show the top-left ``zoom`` × ``zoom`` corner
    (None: the whole matrix), each on its own symmetric colour scale (its max |ΔW| in the title); the spectra
    are normalised, on log axes clipped at ``floor``, with ``reference`` (e.g. full fine-tuning's W − W₀)
    dashed grey in every panel. Returns the figure; unused cells of the last row are hidden.

    Explained in: book/delta_w_gallery.ipynb
    """
    if not isinstance(deltas, Mapping) or not deltas:
        raise ValueError("delta_gallery needs a non-empty dict label -> ΔW")
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols={ncols!r}: a positive number of methods per row")
    n = len(deltas)
    cols = min(n, ncols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(size * cols + 0.4, 2 * rows * size * 0.95 + 0.4),
                             squeeze=False)
    for k, (label, delta) in enumerate(deltas.items()):
        X = _to_numpy(delta)
        if X.ndim != 2:
            raise ValueError(f"delta_gallery: ΔW of {label!r} has shape {X.shape}; it needs a matrix (out × in)")
        row, col = 2 * (k // cols), k % cols
        shown = X if zoom is None else X[:zoom, :zoom]
        heatmap(shown, ax=axes[row][col], colorbar=False, xlabel="input j", ylabel="output i" if col == 0 else "",
                title=f"{label}\nmax |ΔW| {np.abs(X).max():.1e}")
        spec_ax = axes[row + 1][col]
        _delta_spectrum(spec_ax, X, reference, floor)
        if col:
            spec_ax.set_ylabel("")
        if reference is None or k:
            legend = spec_ax.get_legend()
            if legend is not None:
                legend.remove()
    for k in range(n, rows * cols):
        axes[2 * (k // cols)][k % cols].set_visible(False)
        axes[2 * (k // cols) + 1][k % cols].set_visible(False)
    if suptitle:
        fig.suptitle(suptitle)
    return fig


def delta_panel(
    delta: ArrayLike,
    *,
    title: str = "ΔW",
    reference: Optional[ArrayLike] = None,
    part: Optional[tuple[str, Any, str]] = None,
    zoom: Optional[int] = None,
    size: float = 3.2,
    floor: float = 1e-8,
) -> Figure:
    """One update in detail: its heatmap, its normalised spectrum (``reference`` dashed), and the part it is
    built from, ``part = (kind, data, title)``: ``"matrix"`` (a heatmap), ``"spectrum"`` (singular values of a
    matrix), ``"vectors"`` (named 1-D series against their index) or ``"none"``/None (no third panel).

    Explained in: book/delta_w_gallery.ipynb
    """
    X = _to_numpy(delta)
    kind = "none" if part is None else part[0]
    if kind not in ("matrix", "spectrum", "vectors", "none"):
        raise ValueError(f"part kind {kind!r}; valid kinds: 'matrix', 'spectrum', 'vectors', 'none'")
    n = 2 if kind == "none" else 3
    fig, axes = plt.subplots(1, n, figsize=(size * n + 0.6, size), squeeze=False)
    shown = X if zoom is None else X[:zoom, :zoom]
    heatmap(shown, ax=axes[0][0], title=title, xlabel="input j", ylabel="output i", colorbar_label="ΔW")
    _delta_spectrum(axes[0][1], X, reference, floor)
    axes[0][1].set_title("spectrum of ΔW")
    if kind != "none":
        assert part is not None
        ax, data, sub = axes[0][2], part[1], part[2]
        if kind == "matrix":
            heatmap(data, ax=ax, title=sub, xlabel="input j", ylabel="input i", colorbar_label="value")
        elif kind == "spectrum":
            spectrum(data, ax=ax, normalise=True, marker="o")
            ax.set_ylim(floor, 2.0)
            ax.set_title(sub)
        else:
            curves(data, ax=ax, xlabel="index", ylabel="value", title=sub)
    return fig


# ----------------------------------------------------------------------------- curves


def _series(v: Any) -> tuple[np.ndarray, np.ndarray]:
    """x and y of one curve: a sequence of numbers (x = 0, 1, …), a pair (xs, ys), a
    sequence of (x, y) pairs, or a History-like object with a ``.loss`` list."""
    if hasattr(v, "loss") and not hasattr(v, "shape"):
        v = v.loss
    if isinstance(v, tuple) and len(v) == 2 and np.ndim(v[0]) == 1 and np.ndim(v[1]) == 1:
        return np.asarray(v[0], dtype=float), np.asarray(_to_numpy(v[1]), dtype=float)
    y = _to_numpy(v)
    if y.ndim == 2 and y.shape[1] == 2:  # [(x, y), ...]
        return y[:, 0], y[:, 1]
    if y.ndim != 1:
        raise ValueError(f"a curve needs a 1-D sequence, (xs, ys) or (x, y) pairs; got shape {y.shape}")
    return np.arange(y.size, dtype=float), y


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing running mean over ``window`` points (shorter at the start)."""
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def curves(
    data: Mapping[str, Any],
    ax: Optional[Axes] = None,
    xlabel: str = "step",
    ylabel: str = "training loss",
    smooth: int = 0,
    *,
    log: bool = False,
    title: Optional[str] = None,
    raw_alpha: float = 0.25,
    legend: bool | str = True,
) -> Axes:
    """Plot named curves (loss or accuracy against steps) on one axes.

    Each value is a list/array of numbers (x = 0, 1, …), a pair ``(xs, ys)``, a list of
    ``(x, y)`` pairs, or a History-like object with a ``.loss`` list. ``smooth=w`` draws the
    trailing running mean over w points, with the raw curve faint behind it. ``legend=False``
    leaves the legend to the caller (one for a row of panels that share their curves' names);
    ``legend="outside"`` puts it right of the axes, for curves that fill the whole box.

    Explained in: book/products.ipynb
    """
    if not isinstance(data, Mapping) or not data:
        raise ValueError("curves needs a non-empty dict name -> values")
    if legend not in (True, False, "outside"):
        raise ValueError(f"legend={legend!r}: use True (inside the axes), False (none) or 'outside' (right of them)")
    ax = _new_ax(ax)
    integer_x = True
    for k, (name, v) in enumerate(data.items()):
        x, y = _series(v)
        integer_x = integer_x and bool(np.all(np.asarray(x, dtype=float) == np.round(np.asarray(x, dtype=float))))
        color = COLORS[k % len(COLORS)]
        if smooth and smooth > 1:
            ax.plot(x, y, color=color, alpha=raw_alpha, linewidth=1)
            ax.plot(x, _smooth(y, int(smooth)), color=color, label=name)
        else:
            ax.plot(x, y, color=color, label=name)
    if log:
        ax.set_yscale("log")
    if integer_x:  # steps, iterations, ranks: no fractional ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if legend == "outside":
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif legend:
        ax.legend()
    return ax


# ----------------------------------------------------------------------------- bars


def bars(
    counts: Mapping[str, float],
    ax: Optional[Axes] = None,
    ylabel: str = "parameters",
    log: bool = False,
    *,
    annotate: bool = True,
    title: Optional[str] = None,
    colors: Optional[Sequence[str]] = None,
) -> Axes:
    """Bar chart of named counts (e.g. trainable parameters per method), values on the bars.

    Explained in: book/products.ipynb
    """
    if not isinstance(counts, Mapping) or not counts:
        raise ValueError("bars needs a non-empty dict name -> count")
    ax = _new_ax(ax)
    names = [str(n) for n in counts]
    vals = [float(_to_numpy(v)) for v in counts.values()]
    cols = list(colors) if colors is not None else [COLORS[k % len(COLORS)] for k in range(len(vals))]
    rects = ax.bar(names, vals, color=cols)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.grid(axis="x", visible=False)
    if annotate:
        labels = [_fmt_count(v) for v in vals]
        ax.bar_label(rects, labels=labels, padding=2, fontsize=8)
        pos = [v for v in vals if v > 0]
        if log and pos:
            ax.set_ylim(min(pos) / 3, max(pos) * 2)  # room for the smallest bar and the labels
        elif not log:
            ax.set_ylim(0, max(vals) * 1.12 if max(vals) > 0 else 1)
    if len(names) > 4 and max(len(n) for n in names) > 6:
        ax.tick_params(axis="x", labelrotation=30)
        for t in ax.get_xticklabels():
            t.set_horizontalalignment("right")
    if title:
        ax.set_title(title)
    return ax


# ----------------------------------------------------------------------------- scaled activations


def scaled_activations(
    stages: Sequence[Sequence[str]],
    scaled: Mapping[str, str],
    ax: Optional[Axes] = None,
    *,
    title: Optional[str] = None,
) -> Axes:
    """A block's data flow, left to right, with the activations an (IA)³ vector scales marked.

    ``stages``: the block's steps in order, each a list of parallel boxes (module or operation names).
    ``scaled``: box name -> ``"out"`` (a vector ⊙ on its output, drawn after the box) or ``"in"`` (on its
    input, drawn before it); other boxes are frozen and unscaled (grey).

    Explained in: book/ia3.ipynb
    """
    ax = _new_ax(ax, figsize=(max(6.0, 1.35 * len(stages)), 0.9 + 0.75 * max(len(s) for s in stages)))
    width, height, gap = 1.0, 0.5, 0.35
    for i, stage in enumerate(stages):
        x0 = i * (width + gap)
        for j, name in enumerate(stage):
            y0 = -j * (height + 0.25) + (len(stage) - 1) * (height + 0.25) / 2
            side = scaled.get(name)
            face = "#d9e8f5" if side else "#eeeeee"
            ax.add_patch(FancyBboxPatch((x0, y0 - height / 2), width, height, boxstyle="round,pad=0.02",
                                                    facecolor=face, edgecolor=COLORS[0] if side else "#999999"))
            ax.text(x0 + width / 2, y0, name, ha="center", va="center", fontsize=8)
            if side:
                xm = x0 + width + 0.1 if side == "out" else x0 - 0.1
                ax.text(xm, y0 + height / 2 + 0.08, "⊙ l", ha="center", va="bottom", fontsize=9, color=COLORS[3],
                        fontweight="bold")
        if i + 1 < len(stages):
            ax.annotate("", xy=(x0 + width + gap, 0), xytext=(x0 + width, 0),
                        arrowprops=dict(arrowstyle="->", color="#555555", lw=1))
    rows = max(len(s) for s in stages)
    ax.set_xlim(-0.3, len(stages) * (width + gap))
    ax.set_ylim(-rows * 0.45 - 0.3, rows * 0.45 + 0.45)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return ax


# ----------------------------------------------------------------------------- image grids


def image_grid(
    images: ArrayLike,
    row_labels: Optional[Sequence[str]] = None,
    col_labels: Optional[Sequence[str]] = None,
    *,
    vmin: float = -1.0,
    vmax: float = 1.0,
    size: float = 0.75,
    title: Optional[str] = None,
    xlabel: Optional[str] = None,
    ylabel: Optional[str] = None,
) -> Figure:
    """Draw small grey-scale images in a grid: ``images`` shaped (rows, cols, H, W) or (n, H, W) for one row.

    High values are dark (ink on paper), on a fixed range [``vmin``, ``vmax``] shared by all cells, so
    brightness is comparable across the grid. Rows and columns are labelled with what varies along them.

    Explained in: book/integrations.ipynb
    """
    X = _to_numpy(images)
    if X.ndim == 3:
        X = X[None]
    if X.ndim != 4:
        raise ValueError(f"image_grid needs (rows, cols, H, W) or (n, H, W), got shape {tuple(X.shape)}")
    rows, cols = X.shape[:2]
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"got {rows} rows of images but {len(row_labels)} row labels")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"got {cols} columns of images but {len(col_labels)} column labels")
    left = 0.9 if row_labels is not None else 0.2
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + left, size * rows + 0.5), squeeze=False,
                             layout="constrained")
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(X[i, j], cmap="gray_r", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            for spine in ax.spines.values():  # a thin frame: paper-white cells stay visible
                spine.set_visible(True)
                spine.set_linewidth(0.5)
                spine.set_color("0.75")
            if row_labels is not None and j == 0:
                ax.set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
            if col_labels is not None and i == 0:
                ax.set_title(col_labels[j], fontsize=8)
    if xlabel:
        fig.supxlabel(xlabel, fontsize=9)
    if ylabel:
        fig.supylabel(ylabel, fontsize=9)
    if title:
        fig.suptitle(title)
    return fig


def _fmt_count(v: float) -> str:
    if v == int(v):
        return f"{int(v):,}"
    return f"{v:.3g}"


# ----------------------------------------------------------------------------- Pareto plots


def pareto_front(costs: Sequence[float], scores: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats: none has a cost as low and a score as high, one strictly.

    Explained in: book/choosing_a_method.ipynb
    """
    if len(costs) != len(scores):
        raise ValueError(f"pareto_front needs as many costs as scores, got {len(costs)} and {len(scores)}")
    pts = list(zip(map(float, costs), map(float, scores)))
    return [i for i, (c, s) in enumerate(pts)
            if not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for j, (c2, s2) in enumerate(pts) if j != i)]


def pareto(
    points: Mapping[str, tuple[float, float]],
    ax: Optional[Axes] = None,
    xlabel: str = "trainable parameters",
    ylabel: str = "score (%)",
    *,
    logx: bool = True,
    title: Optional[str] = None,
    spread: Optional[Mapping[str, float]] = None,
) -> Axes:
    """Named points (cost, score), each labelled, with the Pareto front (lower cost, higher score) joined.

    ``spread[name]`` draws a vertical error bar (e.g. the standard deviation over seeds). Points on the front
    are filled, the others hollow.

    Explained in: book/choosing_a_method.ipynb
    """
    if not isinstance(points, Mapping) or not points:
        raise ValueError("pareto needs a non-empty dict name -> (cost, score)")
    ax = _new_ax(ax, figsize=(6.0, 4.0))
    names = list(points)
    xs = np.array([float(points[n][0]) for n in names])
    ys = np.array([float(points[n][1]) for n in names])
    front = set(pareto_front(xs, ys))
    for k, n in enumerate(names):
        color = COLORS[k % len(COLORS)]
        err = None if spread is None else float(spread.get(n, 0.0))
        ax.errorbar(xs[k], ys[k], yerr=err, fmt="o", color=color, mfc=color if k in front else "white",
                    capsize=2, markersize=6)
    order = sorted(front, key=lambda i: xs[i])
    ax.step(xs[order], ys[order], where="post", color="#444444", linewidth=1, alpha=0.6, label="Pareto front")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    legend = ax.legend(loc="lower right")
    place_labels(ax, names, xs, ys, colors=[COLORS[k % len(COLORS)] for k in range(len(names))], avoid=[legend])
    return ax


#: where :func:`place_labels` tries a label, in points from its marker: beside it first, then above and below
#: (the first ring), then the same directions further out (a thin line then joins label and marker)
_LABEL_RING = ((6, 3), (6, -9), (-6, 3), (-6, -9), (0, 9), (0, -15), (10, 12), (-10, 12), (10, -18), (-10, -18))
_LABEL_SPOTS = [(dx * r, dy * r) for r in (1, 2, 3, 4, 6) for dx, dy in _LABEL_RING]


def _label_ha(spot: tuple[float, float]) -> str:
    """A label right of its marker starts there, one left of it ends there, one straight above or below centres."""
    return "left" if spot[0] > 0 else "right" if spot[0] < 0 else "center"


def place_labels(ax: Axes, names: Sequence[str], xs: Sequence[float], ys: Sequence[float], *,
                 colors: Optional[Sequence[Any]] = None, fontsize: float = 8, avoid: Sequence[Any] = ()) -> list[Any]:
    """Label each point (xs[i], ys[i]) with names[i] (in colors[i], its marker's colour) where the label overlaps
    no other label, no marker and nothing in ``avoid`` (artists such as a legend), inside the axes: each label
    takes the first free spot of :data:`_LABEL_SPOTS`, crowded points first. A label set further than its first
    ring of spots gets a thin line to its marker; one that finds no free spot takes the spot with the least area
    overlapping or outside the axes. Call it when the axes' limits and scales are final (it places in screen
    space). Returns the annotations. :func:`pareto` labels its points with it.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer() if hasattr(fig.canvas, "get_renderer") else fig._get_renderer()
    pix = ax.transData.transform(np.column_stack([np.asarray(xs, float), np.asarray(ys, float)]))
    to_px = fig.dpi / 72.0
    r = 4.5 * to_px  # a marker's half width (markersize 6 plus its edge), in pixels
    markers = [(px - r, py - r, px + r, py + r) for px, py in pix]
    blocked = [tuple(a.get_window_extent(renderer).extents) for a in avoid]
    frame = ax.get_window_extent(renderer).extents

    def overlap(a: tuple, b: tuple) -> float:
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    # the most crowded points choose first, while spots are still free
    near = [sum(np.hypot(*(pix[i] - pix[j])) < 40 * to_px for j in range(len(pix))) for i in range(len(pix))]
    placed: list[tuple] = []
    anns: list[Any] = [None] * len(names)
    for i in sorted(range(len(names)), key=lambda i: -near[i]):
        ann = ax.annotate(names[i], (xs[i], ys[i]), textcoords="offset points", xytext=_LABEL_SPOTS[0],
                          fontsize=fontsize, va="baseline")
        best = None
        for spot in _LABEL_SPOTS:
            ann.set_position(spot)
            ann.set_ha(_label_ha(spot))
            box = tuple(ann.get_window_extent(renderer).extents)
            outside = (box[2] - box[0]) * (box[3] - box[1]) - overlap(box, frame)  # what sticks out of the axes
            cost = (sum(overlap(box, o) for o in placed + blocked)
                    + sum(overlap(box, m) for j, m in enumerate(markers) if j != i) + outside)
            if best is None or cost < best[0]:
                best = (cost, spot, box)
            if cost == 0:
                break
        _, spot, box = best
        ann.remove()  # the probe; the label itself, with a line to its marker when it sits beyond the first ring
        line = {"arrowstyle": "-", "color": "#888888", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 3}
        anns[i] = ax.annotate(names[i], (xs[i], ys[i]), textcoords="offset points", xytext=spot, fontsize=fontsize,
                              va="baseline", ha=_label_ha(spot), color="black" if colors is None else colors[i],
                              arrowprops=line if _LABEL_SPOTS.index(spot) >= len(_LABEL_RING) else None)
        placed.append(box)
    return anns


# ----------------------------------------------------------------------------- method diagrams


@dataclass(frozen=True)
class Block:
    """One box of a method diagram: a label (mathtext allowed), a short note below it (shape, role) and a kind:
    ``"frozen"`` (pretrained, not trained), ``"train"`` (the adapter's parameters), ``"fixed"`` (no parameters:
    a norm, a scale) or ``"op"`` (an operator drawn as a circle: ``"+"``, ``"⊙"``, ``"×"``)."""

    label: str
    note: str = ""
    kind: str = "train"


@dataclass(frozen=True)
class MethodDiagram:
    """What :func:`method_diagram` draws for one method, bottom (input ``x``) to top (output ``h``).

    ``main``: the frozen path from ``x`` to ``h`` (blocks a multiplicative method puts on it, such as OFT's
    rotation or IA3's scaling vector, are part of it). ``branches``: side paths that also start at ``x``,
    each bottom to top (LoRA: one branch ``A``, ``B``, scale). ``join``: the operator that joins several
    branches (LoHa's ``⊙``, LoKr's ``⊗``, X-LoRA's weighted sum). ``combine``: the operator where the side
    path meets the main one (``"+"`` for an additive update). ``equation`` (mathtext) and ``merge`` (how the
    adapter folds into W₀, or why it cannot) are printed under the drawing.

    A new method adds one entry to :data:`METHOD_DIAGRAMS` (or passes a spec to :func:`method_diagram`).
    """

    title: str
    main: tuple[Block, ...]
    branches: tuple[tuple[Block, ...], ...] = ()
    join: str = ""
    combine: str = "+"
    equation: str = ""
    merge: str = ""


_W0 = Block(r"$W_0$", r"frozen, $d_{out} \times d_{in}$", "frozen")

#: The diagrams of the book's methods, by the name chapters pass to :func:`method_diagram`.
METHOD_DIAGRAMS: dict[str, MethodDiagram] = {
    "lora": MethodDiagram(
        "LoRA: a low-rank detour beside the frozen weight",
        main=(_W0,),
        branches=((Block("$A$", r"$r \times d_{in}$, random"), Block("$B$", r"$d_{out} \times r$, zero at start"),
                   Block(r"$\times\,\alpha/r$", "scaling", "fixed")),),
        equation=r"$h = W_0 x + \frac{\alpha}{r} B A x$",
        merge=r"merge: $W = W_0 + \frac{\alpha}{r} B A$ (no extra inference cost)"),
    "dora": MethodDiagram(
        "DoRA: LoRA on the direction, a trained magnitude per output",
        main=(_W0,),
        branches=((Block("$A$", r"$r \times d_{in}$"), Block("$B$", r"$d_{out} \times r$, zero at start"),
                   Block(r"$\times\,\alpha/r$", "scaling", "fixed")),),
        combine="+",
        equation=r"$h = m \odot \frac{(W_0 + \frac{\alpha}{r} B A)\,x}{\Vert W_0 + \frac{\alpha}{r} B A \Vert_{row}}$"
                 r",  $m$ trained ($d_{out}$)",
        merge=r"merge: $W = m \odot (W_0 + \frac{\alpha}{r}BA)\,/\,\Vert W_0 + \frac{\alpha}{r}BA\Vert_{row}$"),
    "loha": MethodDiagram(
        "LoHa: the Hadamard product of two low-rank products",
        main=(_W0,),
        branches=((Block("$W_{1b}$", r"$r \times d_{in}$"), Block("$W_{1a}$", r"$d_{out} \times r$")),
                  (Block("$W_{2b}$", r"$r \times d_{in}$, zero at start"), Block("$W_{2a}$", r"$d_{out} \times r$"))),
        join="⊙",
        equation=r"$\Delta W = \frac{\alpha}{r}(W_{1a} W_{1b}) \odot (W_{2a} W_{2b})$, rank up to $r^2$;  "
                 r"$h = (W_0 + \Delta W)\,x$",
        merge=r"merge: $W = W_0 + \Delta W$"),
    "lokr": MethodDiagram(
        "LoKr: the Kronecker product of a small and a (low-rank) large factor",
        main=(_W0,),
        branches=((Block("$W_1$", r"$a \times c$, zero at start"),),
                  (Block("$W_{2b}$", r"$r \times d$"), Block("$W_{2a}$", r"$b \times r$"))),
        join="⊗",
        equation=r"$\Delta W = \frac{\alpha}{r}\, W_1 \otimes W_2$,  $W_2 = W_{2a} W_{2b}$,  "
                 r"$d_{out} = ab$, $d_{in} = cd$",
        merge=r"merge: $W = W_0 + \Delta W$"),
    "oft": MethodDiagram(
        "OFT: an orthogonal rotation of the input, learned block by block",
        main=(Block(r"$R^\top$", "orthogonal, block-diagonal, $I$ at start", "train"), _W0),
        combine="",
        equation=r"$h = W_0 R^\top x$,  $R = (I - Q)(I + Q)^{-1}$, $Q^\top = -Q$ per block",
        merge=r"merge: $W = W_0 R^\top$"),
    "boft": MethodDiagram(
        "BOFT: a product of butterfly-sparse orthogonal factors",
        main=(Block(r"$R^\top = (R_m \cdots R_1)^\top$", "butterfly factors, orthogonal", "train"), _W0,
              Block(r"$\odot\, s$", r"scale, $d_{out}$", "train")),
        combine="",
        equation=r"$h = s \odot (W_0 R^\top x)$",
        merge=r"merge: $W = s \odot (W_0 R^\top)$"),
    "ia3": MethodDiagram(
        "IA3: rescale activations with a learned vector",
        main=(_W0, Block(r"$\odot\, l$", r"$d_{out}$, ones at start", "train")),
        combine="",
        equation=r"$h = l \odot (W_0 x)$  (feed-forward layers: $h = W_0 (l \odot x)$)",
        merge=r"merge: $W = \mathrm{diag}(l)\, W_0$"),
    "adalora": MethodDiagram(
        "AdaLoRA: an SVD-shaped update whose rank is reallocated during training",
        main=(_W0,),
        branches=((Block("$Q$", r"$r \times d_{in}$"), Block(r"$\Lambda$", "$r$ singular values, pruned"),
                   Block("$P$", r"$d_{out} \times r$")),),
        equation=r"$h = W_0 x + P \Lambda Q\, x$,  budget of nonzero $\Lambda_{ii}$ shrinks over training",
        merge=r"merge: $W = W_0 + P \Lambda Q$"),
    "llama_adapter": MethodDiagram(
        "LLaMA-Adapter: learned prompts with a zero-initialised gate",
        main=(Block("attention", "frozen, over the tokens", "frozen"),),
        branches=((Block("prompt", r"$K$ learned tokens"), Block("attention", "over the prompt", "fixed"),
                   Block(r"$\times\, g$", "gate, zero at start")),),
        equation=r"$h = \mathrm{Attn}(x) + g \cdot \mathrm{Attn}_{\mathrm{prompt}}(x)$",
        merge="no merge: the prompts are not a weight update"),
    "xlora": MethodDiagram(
        "X-LoRA: a classifier mixes frozen LoRA experts per token",
        main=(_W0,),
        branches=((Block(r"$B_1 A_1$", "LoRA expert", "frozen"),), (Block(r"$B_k A_k$", "LoRA expert", "frozen"),),
                  (Block(r"$\lambda(x)$", "classifier"),)),
        join="Σ",
        equation=r"$h = W_0 x + \sum_i \lambda_i(x)\, B_i A_i\, x$",
        merge="no merge: the weights depend on the input"),
}

_FILL = {"frozen": "#dbe8f5", "train": "#ffe0bf", "fixed": "#eeeeee", "op": "white"}
_EDGE = {"frozen": COLORS[0], "train": COLORS[1], "fixed": "#7f7f7f", "op": "#333333"}


def method_diagram(method: Union[str, MethodDiagram], ax: Optional[Axes] = None) -> Axes:
    """Draw a method as the book draws every method: input ``x`` at the bottom, the frozen path on the left,
    the adapter's path on the right, trained parts in orange, frozen ones in blue, the equation and how it
    merges underneath. ``method``: a key of :data:`METHOD_DIAGRAMS` (``"lora"``, ``"dora"``, ``"loha"``,
    ``"lokr"``, ``"oft"``, ``"boft"``, ``"ia3"``, ``"adalora"``, ``"llama_adapter"``, ``"xlora"``) or a
    :class:`MethodDiagram`.

    Explained in: book/lora.ipynb
    """
    if isinstance(method, str):
        key = method.lower().replace("-", "_")
        if key not in METHOD_DIAGRAMS:
            raise KeyError(f"no diagram for method {method!r}; known: {sorted(METHOD_DIAGRAMS)} "
                           "(or pass a MethodDiagram spec)")
        spec = METHOD_DIAGRAMS[key]
    else:
        spec = method
    if not spec.main:
        raise ValueError("a MethodDiagram needs at least one block on its main path")
    branches = [b for b in spec.branches if b]
    step, bh = 1.15, 0.78  # vertical distance between rows, block height
    rows = max([len(spec.main)] + [len(b) for b in branches])
    join_row = rows + 1 if len(branches) > 1 else None
    top_row = (join_row or rows) + (1 if branches else 0)
    y_of = lambda row: row * step  # noqa: E731  (row 0 is x)
    if ax is None:
        _, ax = plt.subplots(figsize=(6.6, 1.0 + 0.62 * (top_row + 3)))
    ax.set_axis_off()
    ax.set_xlim(0, 10)
    ax.set_ylim(-2.1, y_of(top_row + 1) + 0.5)
    x_main, w_main = 2.6, 3.0
    if len(branches) == 1:
        xs, wb = [7.3], 3.0
    else:
        wb = min(2.6, 4.6 / max(1, len(branches)) - 0.25)
        xs = list(np.linspace(5.7 + wb / 2, 9.9 - wb / 2, len(branches)))

    def box(cx: float, row: int, block: Block, width: float) -> tuple[float, float]:
        cy = y_of(row)
        if block.kind == "op":
            ax.add_patch(mpl.patches.Circle((cx, cy), 0.3, fc="white", ec=_EDGE["op"], lw=1.2))
            ax.text(cx, cy, block.label, ha="center", va="center", fontsize=12)
            return cy - 0.3, cy + 0.3
        ax.add_patch(mpl.patches.FancyBboxPatch((cx - width / 2, cy - bh / 2), width, bh,
                                                boxstyle="round,pad=0.02,rounding_size=0.12",
                                                fc=_FILL.get(block.kind, "white"), ec=_EDGE.get(block.kind, "#333"),
                                                lw=1.3))
        if block.note:
            ax.text(cx, cy + 0.13, block.label, ha="center", va="center", fontsize=11)
            ax.text(cx, cy - 0.2, block.note, ha="center", va="center", fontsize=7.5, color="#444444")
        else:
            ax.text(cx, cy, block.label, ha="center", va="center", fontsize=11)
        return cy - bh / 2, cy + bh / 2

    def arrow(p: tuple[float, float], q: tuple[float, float], style: str = "arc3") -> None:
        ax.add_patch(mpl.patches.FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=11, lw=1.2,
                                                 color="#333333", connectionstyle=style, shrinkA=0, shrinkB=0))

    def node(cx: float, cy: float, label: str) -> None:
        ax.add_patch(mpl.patches.Circle((cx, cy), 0.3, fc="white", ec="#333333", lw=1.2))
        ax.text(cx, cy, label, ha="center", va="center", fontsize=12)

    # input
    ax.text(x_main, y_of(0), "$x$", ha="center", va="center", fontsize=13)
    # main path
    prev = y_of(0) + 0.25
    for i, block in enumerate(spec.main, 1):
        lo, hi = box(x_main, i, block, w_main)
        arrow((x_main, prev), (x_main, lo))
        prev = hi
    # side paths
    ends = []
    for cx, branch in zip(xs, branches):
        lo, hi = box(cx, 1, branch[0], wb)
        ax.plot([x_main, x_main], [y_of(0) + 0.25, y_of(0) + 0.45], color="#333333", lw=1.2)
        arrow((x_main, y_of(0) + 0.45), (cx, lo), "angle,angleA=0,angleB=90,rad=0")
        for i, block in enumerate(branch[1:], 2):
            lo2, hi2 = box(cx, i, block, wb)
            arrow((cx, hi), (cx, lo2))
            hi = hi2
        ends.append((cx, hi))
    if branches:
        if join_row is not None:
            jx = float(np.mean(xs))
            jy = y_of(join_row)
            node(jx, jy, spec.join or "+")
            for cx, hi in ends:
                arrow((cx, hi), (jx, jy - 0.3), "arc3")
            side_end = (jx + 0.0, jy + 0.3)
        else:
            side_end = ends[0]
        cy = y_of(top_row)
        arrow((x_main, prev), (x_main, cy - 0.3))
        node(x_main, cy, spec.combine or "+")
        arrow(side_end, (x_main + 0.3, cy), "angle,angleA=90,angleB=0,rad=0")
        prev = cy + 0.3
        out_y = y_of(top_row + 1)
    else:
        out_y = y_of(len(spec.main) + 1)
    arrow((x_main, prev), (x_main, out_y - 0.25))
    ax.text(x_main, out_y, "$h$", ha="center", va="center", fontsize=13)
    # legend, equation, merge rule
    handles = [mpl.patches.Patch(fc=_FILL[k], ec=_EDGE[k], label=name)
               for k, name in (("frozen", "frozen (pretrained)"), ("train", "trained (the adapter)"))]
    ax.legend(handles=handles, loc="upper right", fontsize=8, frameon=False)
    if spec.equation:
        ax.text(5.0, -1.0, spec.equation, ha="center", va="center", fontsize=10.5)
    if spec.merge:
        ax.text(5.0, -1.75, spec.merge, ha="center", va="center", fontsize=9, color="#333333")
    ax.set_title(spec.title, fontsize=11)
    ax.grid(False)
    return ax


__all__ = [
    "Block",
    "COLORS",
    "METHOD_DIAGRAMS",
    "MethodDiagram",
    "SIGNED_CMAP",
    "STYLE",
    "UNSIGNED_CMAP",
    "bars",
    "curves",
    "heatmap",
    "heatmaps",
    "image_grid",
    "method_diagram",
    "set_style",
    "spectrum",
]

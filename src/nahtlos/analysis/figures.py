"""The figures of a diagnosis report, as PNG bytes.

The seam map, train vs eval mode on the worst tile, the receptive field and the
tile-size sweep: :func:`diagnosis_figures` chooses what to show (central slices of
3D regions, the channel that differs most) and the ``*_figure`` functions draw it.
They use matplotlib's object-oriented API (no pyplot state), so they can be made
from any thread.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ..axes import axis_names
from ..engine.geometry import Block, BlockGrid
from ..nets.receptive_field import ReceptiveField, receptive_field_figure

__all__ = [
    "DisparityView",
    "SeamView",
    "diagnosis_figures",
    "disparity_figure",
    "seam_figure",
    "sweep_figure",
]


@dataclass
class SeamView:
    """A 2D view (a central slice for 3D) of the stitched prediction and its seams.

    Attributes
    ----------
    image
        Input intensities (first channel, after input normalization).
    whole, tiled
        Whole-image and tiled probabilities of ``channel``.
    seam
        ``|tiled - whole|``, largest over channels.
    borders
        Tile borders along the rows and along the columns (positions in the view).
    axes
        Names of the row and column axes.
    where
        Which slice this is (empty for 2D images).
    channel
        Name of the channel shown.
    tolerance
        Largest difference still called "no seams" (the diagnosis' tolerance).
    """

    image: np.ndarray
    whole: np.ndarray
    tiled: np.ndarray
    seam: np.ndarray
    borders: tuple[Sequence[int], Sequence[int]]
    axes: tuple[str, str]
    where: str
    channel: str
    tolerance: float = 1e-5


@dataclass
class DisparityView:
    """A 2D view of one tile predicted in train mode and in eval mode."""

    image: np.ndarray
    train: np.ndarray
    eval: np.ndarray
    axes: tuple[str, str]
    where: str
    tile: str
    channel: str
    one_minus_dice: float
    threshold: float


# Large enough to read when the HTML page scales a figure to its width.
_STYLE: dict[Any, Any] = {
    "font.size": 12,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 14,
}

_PROBABILITY = {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0, "interpolation": "nearest"}

_F = TypeVar("_F", bound=Callable[..., bytes])


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _styled(draw: _F) -> _F:
    """Run a figure function under the report's font sizes."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> bytes:
        import matplotlib

        with matplotlib.rc_context(_STYLE):
            return draw(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _panel_size(shape: tuple[int, ...], n: int, width: float = 15.0) -> tuple[float, float]:
    h, w = shape
    panel_w = width / n
    return width, max(2.6, min(7.5, panel_w * h / max(w, 1) + 1.3))


def _intensity_range(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _four_panels(image: np.ndarray, shape: tuple[int, ...], title: str) -> tuple[Any, Any]:
    """A figure of four panels side by side, the first showing the input ``image``."""
    width, height = _panel_size(shape, 4)
    fig = _new_figure(width, height)
    axs = fig.subplots(1, 4)
    lo, hi = _intensity_range(image)
    axs[0].imshow(image, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
    axs[0].set_title(title)
    return fig, axs


def _label_axes(axs: Any, axes: tuple[str, str]) -> None:
    for ax in axs:
        ax.set_xlabel(axes[1])
        ax.set_ylabel(axes[0])


@_styled
def seam_figure(view: SeamView) -> bytes:
    """Input with tile borders, whole-image and tiled predictions, and the seam map (PNG)."""
    from matplotlib.colors import LogNorm

    fig, axs = _four_panels(view.image, view.seam.shape, "Input image and tile borders")
    axs[1].imshow(view.whole, **_PROBABILITY)
    axs[1].set_title(f"Whole image in one pass\n({view.channel})")
    im = axs[2].imshow(view.tiled, **_PROBABILITY)
    axs[2].set_title(f"Tiled and stitched\n({view.channel})")
    fig.colorbar(im, ax=axs[1:3], shrink=0.8, label="probability")
    floor = 1e-6
    largest = float(np.max(view.seam)) if view.seam.size else 0.0
    sm = axs[3].imshow(
        np.clip(view.seam, floor, 1.0),
        cmap="magma",
        norm=LogNorm(vmin=floor, vmax=1.0),
        interpolation="nearest",
    )
    verdict = "no seams" if largest <= view.tolerance else "seams"
    axs[3].set_title(f"|tiled − whole|, all channels\nlargest {largest:.2g}: {verdict}")
    fig.colorbar(sm, ax=axs[3], shrink=0.8, label="absolute difference (log)")
    for ax in axs:
        for r in view.borders[0]:
            ax.axhline(r - 0.5, color="#00e5ff", lw=0.8, ls="--", alpha=0.8)
        for c in view.borders[1]:
            ax.axvline(c - 0.5, color="#00e5ff", lw=0.8, ls="--", alpha=0.8)
    _label_axes(axs, view.axes)
    if view.where:
        fig.suptitle(view.where)
    return _png(fig)


@_styled
def disparity_figure(view: DisparityView) -> bytes:
    """Input, train-mode and eval-mode predictions of one tile, and their difference (PNG)."""
    fig, axs = _four_panels(view.image, view.train.shape, "Input tile")
    for ax, data, name in ((axs[1], view.train, "Train mode"), (axs[2], view.eval, "Eval mode")):
        im = ax.imshow(data, **_PROBABILITY)
        if np.nanmin(data) < view.threshold < np.nanmax(data):
            ax.contour(data, levels=[view.threshold], colors="white", linewidths=0.8)
        ax.set_title(f"{name}\n({view.channel})")
    fig.colorbar(im, ax=axs[1:3], shrink=0.8, label="probability")
    diff = np.abs(view.train - view.eval)
    dm = axs[3].imshow(diff, cmap="inferno", vmin=0.0, vmax=1.0, interpolation="nearest")
    axs[3].set_title(f"|train − eval|\n1 − Dice = {view.one_minus_dice:.2g}")
    fig.colorbar(dm, ax=axs[3], shrink=0.8, label="absolute difference")
    _label_axes(axs, view.axes)
    fig.suptitle(f"Worst tile: {view.tile}" + (f" — {view.where}" if view.where else ""))
    return _png(fig)


@_styled
def sweep_figure(
    sweep: Sequence[Mapping[str, Any]],
    channel_names: Sequence[str],
    whole_dice: Sequence[float | None] | None = None,
    tolerance: float = 1e-5,
    current: int | None = None,
) -> bytes:
    """Agreement with the whole image, largest difference and Dice vs tile size (PNG).

    Like the paper's Fig. 6; ``whole_dice`` (Dice of the whole-image prediction, the
    limit of large tiles) is drawn as dashed lines when labels were given.
    """
    points = sorted(sweep, key=lambda p: p["size"])
    sizes = [int(p["size"]) for p in points]
    has_dice = any(p.get("dice") is not None for p in points)
    n = 3 if has_dice else 2
    fig = _new_figure(5.2 * n, 4.2)
    axs = fig.subplots(1, n)
    colors = [f"C{i}" for i in range(len(channel_names))]
    # distinct markers and dashes: equal curves (common when seamless) stay visible
    styles = [
        {"color": colors[c], "marker": "os^Dv<>p"[c % 8], "ls": ("-", "--", ":", "-.")[c % 4]}
        for c in range(len(channel_names))
    ]
    labels = [
        "whole" if int(p["blocks"]) == 1 else "×".join(str(t) for t in p["tile"]) for p in points
    ]

    def setup(ax: Any, title: str, ylabel: str) -> None:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, labels, rotation=30 if len(sizes) > 3 else 0, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("tile size (voxels; window = tile + 2 × halo)")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if current is not None:
            ax.axvline(current, color="0.6", lw=1, ls=":")

    ax = axs[0]
    for c, name in enumerate(channel_names):
        ax.plot(sizes, [p["agreement"][c] for p in points], label=name, **styles[c])
    low = min((min(p["agreement"]) for p in points), default=1.0)
    ax.set_ylim(min(low - 0.02, 0.95), 1.005)
    setup(ax, "Agreement with the whole-image prediction", "Dice (tiled vs whole masks)")
    ax.legend(fontsize=8)

    ax = axs[1]
    floor = 1e-8
    ax.plot(sizes, [max(float(p["max_difference"]), floor) for p in points], "o-", color="k")
    ax.axhline(tolerance, color="tab:green", ls="--", lw=1)
    ax.text(sizes[0], tolerance * 1.5, "seamless below", color="tab:green", fontsize=8)
    if any(float(p["max_difference"]) == 0 for p in points):
        ax.text(sizes[0], floor * 2, "bottom row: identical (0)", fontsize=8, color="0.3")
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, 2.0)
    setup(ax, "Largest |tiled − whole|", "absolute difference (log)")

    if has_dice:
        ax = axs[2]
        for c, name in enumerate(channel_names):
            ys = [(p["dice"] or [None] * len(channel_names))[c] for p in points]
            if all(y is None for y in ys):
                continue
            ax.plot(sizes, [math.nan if y is None else y for y in ys], label=name, **styles[c])
            limit = None if whole_dice is None else whole_dice[c]
            if limit is not None:
                ax.axhline(float(limit), color=colors[c], ls="--", lw=1)
        ax.set_ylim(-0.02, 1.02)
        setup(ax, "Dice against the labels (eval mode)", "Dice")
        ax.legend(fontsize=8, title="dashed: whole image", title_fontsize=7)
    if current is not None:
        fig.suptitle("dotted line: the tile size diagnosed above", fontsize=9, color="0.4")
    return _png(fig)


# --------------------------------------------------------------------------- a diagnosis


def _slice_2d(volume: np.ndarray, spatial_index: int | None) -> np.ndarray:
    """``(..., [Z,] Y, X) -> (..., Y, X)``: the slice ``Z = spatial_index`` of 3D data."""
    return volume if spatial_index is None else volume[..., spatial_index, :, :]


def _seam_view(
    arr: np.ndarray,
    whole: np.ndarray,
    tiled: np.ndarray,
    seam: np.ndarray,
    grid: BlockGrid,
    channel_names: Sequence[str],
    tolerance: float,
) -> SeamView:
    """The central slice of the region, the channel with the largest seams."""
    names = axis_names(len(grid.shape))
    z = grid.shape[0] // 2 if len(grid.shape) == 3 else None
    c = int(np.argmax([seam[k].max() for k in range(seam.shape[0])]))
    return SeamView(
        image=_slice_2d(arr[0], z),
        whole=_slice_2d(whole[c], z),
        tiled=_slice_2d(tiled[c], z),
        seam=_slice_2d(seam, z).max(axis=0),
        borders=(
            list(range(grid.block[-2], grid.shape[-2], grid.block[-2])),
            list(range(grid.block[-1], grid.shape[-1], grid.block[-1])),
        ),
        axes=(names[-2], names[-1]),
        where=f"{names[0]} = {z} (central slice)" if z is not None else "",
        channel=channel_names[c],
        tolerance=tolerance,
    )


def _disparity_view(
    arr: np.ndarray,
    train: np.ndarray,
    tiled: np.ndarray,
    block: Block,
    worst: Mapping[str, Any],
    channel_names: Sequence[str],
    threshold: float,
) -> DisparityView:
    """The worst tile's central slice, the channel where train and eval mode differ most."""
    inner = block.inner
    names = axis_names(len(inner))

    def at(channel: int) -> tuple[Any, ...]:
        return (channel, *inner)

    losses = list(worst["per_channel"])
    diffs = [float(np.abs(train[at(k)] - tiled[at(k)]).max()) for k in range(len(losses))]
    c = max(range(len(losses)), key=lambda k: (losses[k], diffs[k]))
    zt = (inner[0].stop - inner[0].start) // 2 if len(inner) == 3 else None
    return DisparityView(
        image=_slice_2d(arr[at(0)], zt),
        train=_slice_2d(train[at(c)], zt),
        eval=_slice_2d(tiled[at(c)], zt),
        axes=(names[-2], names[-1]),
        where=f"{names[0]} = {inner[0].start + zt} (central slice of the tile)"
        if zt is not None
        else "",
        tile=", ".join(f"{n} {s.start}–{s.stop}" for n, s in zip(names, inner, strict=True)),
        channel=channel_names[c],
        one_minus_dice=losses[c],
        threshold=threshold,
    )


def _rf_figure(rf: ReceptiveField, mass: float) -> bytes:
    """The receptive-field picture of :mod:`nahtlos.nets.receptive_field`, as PNG bytes."""
    buf = io.BytesIO()
    receptive_field_figure(rf, mass=mass).savefig(buf, format="png", dpi=120)
    return buf.getvalue()


def diagnosis_figures(
    *,
    arr: np.ndarray,
    whole: np.ndarray,
    tiled: np.ndarray,
    seam: np.ndarray,
    grid: BlockGrid,
    train: np.ndarray | None,
    worst_block: Block | None,
    worst: Mapping[str, Any] | None,
    rf: ReceptiveField | None,
    sweep: Sequence[Mapping[str, Any]],
    channel_names: Sequence[str],
    threshold: float,
    tolerance: float,
    whole_dice: Sequence[float | None] | None,
    erf_mass: float,
) -> dict[str, bytes]:
    """The report's figures by name (``train_eval`` only where the disparity was measured,
    ``receptive_field`` only where it was)."""
    figures = {
        "seam_map": seam_figure(_seam_view(arr, whole, tiled, seam, grid, channel_names, tolerance))
    }
    if train is not None and worst_block is not None and worst is not None:
        view = _disparity_view(arr, train, tiled, worst_block, worst, channel_names, threshold)
        figures["train_eval"] = disparity_figure(view)
    if rf is not None:
        figures["receptive_field"] = _rf_figure(rf, erf_mass)
    figures["tile_sweep"] = sweep_figure(
        sweep, channel_names, whole_dice=whole_dice, tolerance=tolerance, current=max(grid.block)
    )
    return figures

"""The picture of a receptive field: the ERF map with the TRF, ERF contours and the halo.

matplotlib and scipy are imported only when a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .erf import MASSES, erf_levels
from .result import ReceptiveField

__all__ = ["plot_receptive_field", "receptive_field_figure"]

_TRF_COLOR = "#00e676"
_WHOLE_TILE_COLOR = "#ff1744"
_HALO_COLOR = "#ffd600"
_CONTOUR_COLORS = ("#18ffff", "#448aff", "#e040fb")


def plot_receptive_field(
    rf: ReceptiveField,
    path: str | Path,
    *,
    mass: float = 0.99,
    title: str | None = None,
) -> Path:
    """Save :func:`receptive_field_figure` to ``path``.

    Returns
    -------
    Path
        The written image (any format matplotlib knows from the suffix).
    """
    path = Path(path)
    receptive_field_figure(rf, mass=mass, title=title).savefig(path, dpi=120)
    return path


def receptive_field_figure(
    rf: ReceptiveField, *, mass: float = 0.99, title: str | None = None
) -> Any:
    """Draw the ERF gradient map (log scale) with the TRF box and ERF contours.

    Like the paper's Fig. 4: the mean absolute gradient of the centre output voxel
    w.r.t. the input on a log colour scale; the TRF as a box (the whole tile, in red,
    for tile-dependent models, with the local TRF dashed); contours holding 90, 99
    and 99.9 % of the gradient mass (of the statistics-frozen ERF for tile-dependent
    models: the part a halo can capture), drawn on a slightly smoothed map so that
    they read as regions; and the recommended halo. 3D fields show the central
    slices through the centre voxel.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (not attached to pyplot, so nothing to close).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if rf.ndim not in (2, 3):
        raise ValueError(f"plotting supports 2D and 3D receptive fields, not {rf.ndim}D")
    # (row axis, column axis, dropped axis) of each panel
    views = [(0, 1, -1)] if rf.ndim == 2 else [(1, 2, 0), (0, 2, 1)]
    fig = Figure(figsize=(5.0 * len(views) + 1.0, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    halo = rf.halo(mass)
    panels = _Panels(rf)
    image = None
    for k, view in enumerate(views):
        image = panels.draw(fig.add_subplot(1, len(views), k + 1), view, halo)
    fig.legend(
        handles=_legend_handles(rf, halo),
        loc="outside lower center",
        ncols=2,
        fontsize=8,
        frameon=False,
    )
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.8, label="|∂ centre output / ∂ input|")
    fig.suptitle(_default_title(rf) if title is None else title, fontsize=10)
    return fig


def _csv(v: Sequence[int]) -> str:
    return ",".join(str(int(x)) for x in v)


def _box(
    ax: Any,
    center: Sequence[int],
    ay: int,
    ax_: int,
    before: Sequence[int],
    after: Sequence[int],
    **style: Any,
) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(
        Rectangle(
            (center[ax_] - before[ax_] - 0.5, center[ay] - before[ay] - 0.5),
            before[ax_] + after[ax_] + 1,
            before[ay] + after[ay] + 1,
            fill=False,
            **style,
        )
    )


class _Panels:
    """What every panel of one figure shares: the maps, the colour range and the contours."""

    def __init__(self, rf: ReceptiveField) -> None:
        from scipy.ndimage import gaussian_filter

        self.rf = rf
        self.erf = rf.erf.astype(np.float64)
        halo_erf = (rf.erf_local if rf.erf_local is not None else rf.erf).astype(np.float64)
        self.smooth = gaussian_filter(halo_erf, 1.0)
        self.levels = erf_levels(self.smooth)
        positive = self.erf[self.erf > 0]
        self.any_positive = bool(positive.size)
        self.vmax = float(self.erf.max()) if positive.size else 1.0
        self.vmin = max(float(positive.min()) if positive.size else 1e-12, self.vmax * 1e-12)

    def _cut(self, a: np.ndarray, drop: int) -> np.ndarray:
        return a if self.rf.ndim == 2 else np.take(a, self.rf.erf_center[drop], axis=drop)

    def draw(self, ax: Any, view: tuple[int, int, int], halo: Sequence[int]) -> Any:
        """One panel (a central slice in 3D); returns its image for the colour bar."""
        from matplotlib.colors import LogNorm

        ay, ax_, drop = view
        rf, c = self.rf, self.rf.erf_center
        image = ax.imshow(
            np.clip(self._cut(self.erf, drop), self.vmin, None),
            norm=LogNorm(vmin=self.vmin, vmax=self.vmax),
            cmap="magma",
            interpolation="nearest",
        )
        plane = self._cut(self.smooth, drop)
        lv = sorted(zip(self.levels, _CONTOUR_COLORS, strict=True))
        if self.any_positive and len({v for v, _ in lv}) == len(lv):
            ax.contour(
                plane, levels=[v for v, _ in lv], colors=[col for _, col in lv], linewidths=1.2
            )
        _draw_trf(ax, rf, view, plane.shape)
        _box(ax, c, ay, ax_, halo, halo, edgecolor=_HALO_COLOR, linewidth=1.4, linestyle="--")
        ax.plot([c[ax_]], [c[ay]], marker="+", color="#00e5ff", markersize=10)
        names = rf.axes
        ax.set_xlabel(f"{names[ax_]} (voxels)")
        ax.set_ylabel(f"{names[ay]} (voxels)")
        if rf.ndim == 3:
            ax.set_title(f"central slice {names[drop]} = {c[drop]}", fontsize=9)
        return image


def _draw_trf(
    ax: Any, rf: ReceptiveField, view: tuple[int, int, int], plane_shape: tuple[int, ...]
) -> None:
    """The TRF box, or for tile-dependent models the whole tile and the local TRF."""
    from matplotlib.patches import Rectangle

    ay, ax_, _ = view
    c = rf.erf_center
    if rf.trf_before is not None and rf.trf_after is not None:
        _box(ax, c, ay, ax_, rf.trf_before, rf.trf_after, edgecolor=_TRF_COLOR, linewidth=2.2)
        return
    h, w = plane_shape
    ax.add_patch(
        Rectangle((-0.5, -0.5), w, h, fill=False, edgecolor=_WHOLE_TILE_COLOR, linewidth=5)
    )
    if rf.local_trf_before is not None and rf.local_trf_after is not None:
        _box(
            ax,
            c,
            ay,
            ax_,
            rf.local_trf_before,
            rf.local_trf_after,
            edgecolor=_TRF_COLOR,
            linewidth=1.6,
            linestyle=":",
        )


def _legend_handles(rf: ReceptiveField, halo: Sequence[int]) -> list[Any]:
    from matplotlib.lines import Line2D

    handles = []
    if rf.trf_radius is not None:
        handles.append(
            Line2D([], [], color=_TRF_COLOR, lw=2.2, label=f"TRF, radius {_csv(rf.trf_radius)}")
        )
    else:
        handles.append(Line2D([], [], color=_WHOLE_TILE_COLOR, lw=4, label="TRF = whole tile"))
        if rf.local_trf_radius is not None:
            label = f"TRF with tile statistics frozen, radius {_csv(rf.local_trf_radius)}"
            handles.append(Line2D([], [], color=_TRF_COLOR, lw=1.6, ls=":", label=label))
    handles.append(
        Line2D([], [], color=_HALO_COLOR, lw=1.4, ls="--", label=f"recommended halo {_csv(halo)}")
    )
    which = "ERF" if rf.erf_local is None else "ERF (statistics frozen)"
    for m, col in zip(MASSES, _CONTOUR_COLORS, strict=True):
        label = f"{which} {m * 100:g}%, radius {_csv(rf.erf_radius(m))}"
        handles.append(Line2D([], [], color=col, lw=1.2, label=label))
    return handles


def _default_title(rf: ReceptiveField) -> str:
    if rf.tile_dependent:
        kinds = ", ".join(sorted({x.type for x in rf.culprits})) or "unknown layers"
        state = f"tile-dependent ({kinds})"
    else:
        state = "tile-independent"
    return f"Receptive field: {state}, alignment {_csv(rf.alignment)}"

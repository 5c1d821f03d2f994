"""The figures of a run: the tile-size sweep and the stitched predictions.

Drawn with matplotlib (Agg) from the rows of :mod:`.tables` and the arrays of
:func:`~.studies.stitched_arrays`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .inputs import output_classes
from .presets import INPUT_LABEL, NORM_LABEL, REPORTED_CLASSES, TABLE1_NORMS

__all__ = ["plot_stitched", "plot_sweep"]


_COLORS = {
    ("batch", "global"): "C0",
    ("batch", "tilewise"): "C9",
    ("instance", "global"): "C3",
    ("instance", "tilewise"): "C1",
    ("batchrenorm", "global"): "C2",
    ("identity", "global"): "C7",
}


def plot_sweep(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    training_window: int | None = None,
    gs_rows: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Eval Dice against inference window, one line per norm (the paper's Fig. 6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in REPORTED_CLASSES if any(r["dataset"] == d for r in rows)]
    ncols = max(len(REPORTED_CLASSES[d]) for d in datasets)
    ncols = max(ncols, 3)  # room for the legend
    fig, axes = plt.subplots(
        len(datasets), ncols, figsize=(3.3 * ncols, 2.6 * len(datasets) + 0.9), squeeze=False
    )
    numeric = sorted({int(r["window"]) for r in rows if r["window"] != "whole"})
    whole_x = numeric[-1] * 1.6 if numeric else 1.0
    for i, d in enumerate(datasets):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(REPORTED_CLASSES[d]):
                ax.axis("off")
                continue
            cls = REPORTED_CLASSES[d][j]
            for column in TABLE1_NORMS:
                pts = [
                    (whole_x if r["window"] == "whole" else int(r["window"]), r.get(f"dice_{cls}"))
                    for r in rows
                    if r["dataset"] == d and (r["norm"], r["input_norm"]) == column
                ]
                pts = sorted(p for p in pts if p[1] is not None)
                if pts:
                    label = f"{NORM_LABEL[column[0]]} ({INPUT_LABEL[column[1]]} in)"
                    ax.plot(*zip(*pts, strict=True), marker=".", color=_COLORS[column], label=label)
            for g in gs_rows:
                if g["dataset"] == d and g["statistics"] == "global" and g.get(f"dice_{cls}"):
                    ax.plot(
                        [whole_x],
                        [g[f"dice_{cls}"]],
                        marker="*",
                        ms=11,
                        color="C3",
                        ls="",
                        label="InstanceNorm, whole-image stats (block-wise)",
                    )
            if training_window:
                ax.axvline(training_window, color="0.6", ls=":", lw=1)
            ax.set_xscale("log")
            ticks = [*numeric, whole_x]
            ax.set_xticks(ticks)
            ax.set_xticklabels([*(str(t) for t in numeric), "whole"], fontsize=7)
            ax.minorticks_off()
            ax.set_title(f"{d}: {cls}", fontsize=9)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("eval Dice")
            if i == len(datasets) - 1:
                ax.set_xlabel("inference window (pixels)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:
        h, lab = ax.get_legend_handles_labels()
        for hh, ll in zip(h, lab, strict=True):
            if ll not in labels:
                handles.append(hh)
                labels.append(ll)
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.9 / (2.6 * len(datasets) + 0.9), 1, 1))
    p = Path(path)
    fig.savefig(p, dpi=80)
    plt.close(fig)
    return p


def plot_stitched(
    arrays: Mapping[tuple[str, str], Mapping[str, np.ndarray]],
    dataset: str,
    path: str | os.PathLike[str],
) -> Path:
    """Stitched predictions per norm on one image, with the difference of two tilings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    names = output_classes(dataset)
    b = names.index("boundaries")
    columns = [c for c in TABLE1_NORMS if c in arrays]
    n = len(columns) + 1
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 5.0), squeeze=False)
    first = arrays[columns[0]]
    img = np.asarray(first["image"], dtype=np.float32)
    lo, hi = np.percentile(img, (1, 99.8))
    axes[0][0].imshow(img, cmap="gray", vmin=lo, vmax=hi)
    axes[0][0].set_title("image", fontsize=8)
    axes[1][0].axis("off")
    axes[1][0].text(
        0.0,
        0.5,
        "top: boundaries probability,\ntiles of the first grid\n\n"
        "bottom: largest |difference|\nover classes between two\ntilings (grid shifted by\n"
        "half a block), log scale\n1e-4 to 1; black: equal\n(below 1e-4); grey: not\ncompared "
        "(new border)",
        fontsize=7,
        va="center",
    )
    diff_norm = LogNorm(1e-4, 1.0)
    cmap = plt.get_cmap("inferno").with_extremes(under="black", bad="0.75")
    for k, column in enumerate(columns, start=1):
        a = arrays[column]
        pred = np.asarray(a["prediction"], dtype=np.float32)[b]
        diff = np.asarray(a["difference"], dtype=np.float32)
        block = [int(v) for v in a["block"]]
        shift = [int(v) for v in a["shift"]]
        halo = [int(v) for v in a["halo"]]
        axes[0][k].imshow(pred, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        for axis, size in enumerate(block):
            for pos in range(size, pred.shape[axis], size):
                if axis == 0:
                    axes[0][k].axhline(pos - 0.5, color="c", lw=0.5, alpha=0.7)
                else:
                    axes[0][k].axvline(pos - 0.5, color="c", lw=0.5, alpha=0.7)
        shown = np.ma.masked_invalid(np.where(diff == 0, 1e-12, diff))  # 0 -> "under"
        axes[1][k].imshow(shown, cmap=cmap, norm=diff_norm, interpolation="nearest")
        valid = diff[shift[0] + halo[0] :, shift[1] + halo[1] :]
        worst = float(np.nanmax(valid)) if valid.size and np.isfinite(valid).any() else 0.0
        label = "identical" if worst <= 1e-5 else f"max {worst:.2f}"
        norm, inp = column
        axes[0][k].set_title(f"{NORM_LABEL[norm]}\n({INPUT_LABEL[inp]} input)", fontsize=8)
        axes[1][k].set_title(f"two tilings: {label}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{dataset}: U-Net predictions stitched from tiles", fontsize=10)
    fig.tight_layout(h_pad=2.5)
    p = Path(path)
    fig.savefig(p, dpi=72)
    plt.close(fig)
    return p

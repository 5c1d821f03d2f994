"""A training run's logs: CSV files that survive a resume, and the curves figure."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CsvLog", "plot_curves"]


class CsvLog:
    """A CSV log that, on resume, keeps only the rows up to the checkpoint's step."""

    def __init__(self, path: Path, columns: Sequence[str], keep_until: int | None) -> None:
        self.path = path
        self.columns = list(columns)
        rows: list[dict[str, str]] = []
        if keep_until is not None and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)


def plot_curves(out: Path, names: Sequence[str]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log, val = out / "log.csv", out / "validation.csv"
    if not log.exists():
        return None
    with log.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, loss, color="0.75", lw=0.8, label="loss")
    width = max(1, len(loss) // 50)
    if width > 1:
        smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
        ax1.plot(steps[width - 1 :], smooth, color="C0", label=f"mean of {width}")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss")
    ax1.set_title("training loss")
    ax1.legend()
    if val.exists():
        with val.open(newline="") as f:
            vrows = list(csv.DictReader(f))
        if vrows:
            vsteps = [int(r["step"]) for r in vrows]
            for i, name in enumerate(names):
                for mode, style in (("eval", "-"), ("train", "--")):
                    ys = [float(r[f"dice_{mode}_{name}"] or "nan") for r in vrows]
                    ax2.plot(vsteps, ys, style, color=f"C{i}", marker=".", label=f"{name} ({mode})")
            ax2.set_ylim(0, 1)
            ax2.legend(fontsize="small")
    r_max = np.array([float(r["r_max"]) for r in rows])
    if (r_max > 1).any():  # BatchRenorm: mark where the warm-up ends and the ramp ends
        start = steps[np.argmax(r_max > 1)] - 1
        end = steps[np.argmax(r_max >= r_max.max())]
        for ax in (ax1, ax2):
            ax.axvspan(start, end, color="0.9", zorder=0, label="r_max/d_max ramp")
        ax1.legend()
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("validation Dice")
    ax2.set_title("validation (block-wise; solid eval, dashed train mode)")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

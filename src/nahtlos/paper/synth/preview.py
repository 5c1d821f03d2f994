"""A PNG montage of synthetic samples: image, instance labels and semantic classes.

Reads only the planes shown, so samples opened lazily from disk
(:func:`~.files.open_synthetic`) of any size can be previewed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .sample import SynthSample, class_names, semantic_classes

__all__ = ["save_preview"]


def _colorize(labels: np.ndarray) -> np.ndarray:
    """Random but stable colours per label id, black background."""
    ids = labels.astype(np.uint64)
    h = (ids * np.uint64(2654435761)) % np.uint64(2**32)
    rgb = np.stack(
        [((h >> np.uint64(s)) & np.uint64(255)).astype(np.float32) / 255 for s in (0, 8, 16)], -1
    )
    rgb = 0.25 + 0.75 * rgb
    rgb[labels == 0] = 0
    return rgb


def _section(sample: SynthSample, axis: int, index: int) -> tuple[np.ndarray, ...]:
    """Image, labels and classes of one plane, reading only a 3-plane slab.

    Works on array-likes opened from disk. Classes come from the slab's 3D labels, so
    they are the 3D boundaries of the volume, not those of the plane alone.
    """
    lo, hi = max(index - 1, 0), min(index + 2, sample.image.shape[axis])

    def slab(arr: Any) -> np.ndarray:
        sl = [slice(None)] * sample.image.ndim
        sl[axis] = slice(lo, hi)
        return np.asarray(arr[tuple(sl)])

    labels = slab(sample.labels)
    sem = slab(sample.semantic) if sample.semantic is not None else semantic_classes(labels)
    take = index - lo
    return tuple(np.take(a, take, axis=axis) for a in (slab(sample.image), labels, sem))


def save_preview(
    samples: Sequence[SynthSample], path: str | os.PathLike[str], *, dpi: int = 100
) -> Path:
    """Save a PNG montage: per sample a row of image, instance labels and classes.

    3D samples show their middle Z slice and, below it, the middle XZ section (drawn
    with the Z step to scale). Arrays may be array-likes opened from disk: only the
    planes shown are read.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float, str]] = []
    for s in samples:
        names = " / ".join(class_names(s.name))
        shape = tuple(s.image.shape)
        if len(shape) == 2:
            img, lab, sem = (
                np.asarray(s.image),
                np.asarray(s.labels),
                np.asarray(s.semantic) if s.semantic is not None else None,
            )
            sem = semantic_classes(lab) if sem is None else sem
            rows.append((f"{s.name} 2D {shape}", img, lab, sem, 1.0, names))
        else:
            z, y = shape[0] // 2, shape[1] // 2
            title = f"{s.name} 3D {shape}, anisotropy {s.anisotropy:g}"
            img, lab, sem = _section(s, 0, z)
            rows.append((f"{title}, z={z}", img, lab, sem, 1.0, names))
            img, lab, sem = _section(s, 1, y)
            rows.append((f"XZ section y={y}", img, lab, sem, s.anisotropy, names))
    heights = [r[1].shape[0] * r[4] / r[1].shape[1] for r in rows]
    fig, axs = plt.subplots(
        len(rows),
        3,
        figsize=(9.6, 3.2 * sum(heights) + 0.35 * len(rows)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    cmap = ListedColormap(["#1b1b1b", "#3b8bd9", "#f2c12e"])
    for (title, img, lab, sem, aspect, names), ax in zip(rows, axs, strict=True):
        lo, hi = np.percentile(img, (0.5, 99.8))
        ax[0].imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax[1].imshow(_colorize(lab), aspect=aspect, interpolation="nearest")
        ax[2].imshow(sem, cmap=cmap, vmin=0, vmax=2, aspect=aspect, interpolation="nearest")
        ax[0].set_title(title, fontsize=8, loc="left")
        ax[1].set_title("instances", fontsize=8, loc="left")
        ax[2].set_title(f"classes: {names}", fontsize=8, loc="left")
        for a in ax:
            a.set_axis_off()
    fig.tight_layout(pad=0.4)
    out = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    plt.close(fig)
    # a 256-colour palette keeps noisy microscopy PNGs small, with no visible loss
    from PIL import Image

    Image.open(buffer).convert("RGB").quantize(256).save(out, optimize=True)
    return out

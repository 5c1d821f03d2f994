"""Pictures for docs/training.md: a trained checkpoint's prediction beside the ground truth.

Usage (after the commands in docs/training.md)::

    .venv/bin/python docs/make_training_figures.py RUN_DIR IMAGE LABELS OUT.png

Predicts IMAGE block-wise with RUN_DIR/model.pt (input normalization, activation, halo
and alignment from the checkpoint) and shows image, predicted classes and ground-truth
classes, with the validation part (the right half) marked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from nahtlos import load_model, open_image, predict_blockwise
from nahtlos.io import instances_to_semantic


def main(run: Path, image_path: str, labels_path: str, out: Path) -> None:
    loaded = load_model(run / "model.pt")
    meta = loaded.metadata
    image = np.asarray(open_image(image_path)[...])
    pred = predict_blockwise(
        loaded.module,
        image,
        meta["block"],
        meta["halo"],
        meta["alignment"],
        ndim=meta["ndim"],
        input_transform=loaded.input_transform(image, meta["ndim"]),
        output_transform=loaded.output_transform(),
        progress=False,
    )
    truth = instances_to_semantic(np.asarray(open_image(labels_path)[...]))

    def rgb(classes: np.ndarray) -> np.ndarray:
        # boundaries yellow, foreground blue, background dark
        b, f = classes[0] > 0.5, classes[1] > 0.5
        out = np.full((*b.shape, 3), 0.1)
        out[f] = (0.2, 0.5, 0.9)
        out[b] = (1.0, 0.8, 0.1)
        return out

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    lo, hi = np.percentile(image, [1, 99.8])
    axes[0].imshow(image, cmap="gray", vmin=lo, vmax=hi)
    axes[1].imshow(rgb(pred))
    axes[2].imshow(rgb(truth))
    titles = ("image", f"prediction ({meta['norm']}, eval mode, block-wise)", "ground truth")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.axvline(image.shape[1] / 2 - 0.5, color="w", lw=1, ls="--")
        ax.text(image.shape[1] * 0.52, 12, "validation", color="w", va="top")
        ax.text(image.shape[1] * 0.02, 12, "training", color="w", va="top")
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=64)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]))

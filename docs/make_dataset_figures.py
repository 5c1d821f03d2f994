"""Make the pictures of docs/datasets.md: one montage per synthetic dataset.

.venv/bin/python docs/make_dataset_figures.py
"""

from __future__ import annotations

from pathlib import Path

from nahtlos.paper.synth import SYNTHETIC_DATASETS, save_preview, synthesize

OUT = Path(__file__).parent / "img"

if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name in SYNTHETIC_DATASETS:
        flat = synthesize(name, (384, 384), seed=0)
        volume = synthesize(name, (48, 192, 192), seed=0, anisotropy=2.0)
        path = save_preview([flat, volume], OUT / f"synth-{name}.png", dpi=90)
        print(f"{path}: {path.stat().st_size // 1024} KiB")

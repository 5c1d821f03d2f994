"""The short ``nahtlos train`` command on a real 2D nuclei image, BatchRenorm vs InstanceNorm.

A new user's first run: train on the left half of an annotated image with the defaults
(``--dims 2 --steps 300 --patch 128,128``), predict the right half with the checkpoint,
and compare foreground and boundary Dice of BatchRenorm with its peer InstanceNorm (same
data, steps and seeds). ``--recipe paper`` repeats it with the paper's recipe (Dice loss,
constant learning rate, no recalibration) for comparison.

The image: the 2D nuclei test image of StarDist (a DSB 2018 fluorescence image, 512 x 512,
with 125 annotated nuclei, BSD-3-Clause), which this repository does not ship::

    pip download stardist==0.9.2 --no-deps -d /tmp/stardist
    cd /tmp/stardist && unzip -o stardist-*.whl 'stardist/data/images/*'
    python benchmarks/nuclei_2d.py --image /tmp/stardist/stardist/data/images/img2d.tif \\
        --labels /tmp/stardist/stardist/data/images/mask2d.tif --out build/nuclei --seeds 0,1
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

RECIPES = {
    "defaults": [],
    "paper": [
        "--set",
        "train.loss=dice",
        "--set",
        "train.lr_schedule=constant",
        "--set",
        "train.recalibrate=0",
    ],
}


def _nahtlos(*args: str) -> None:
    cmd = [sys.executable, "-c", "from nahtlos.cli import main; main()", *args]
    subprocess.run(cmd, check=True)


def _halves(image: Path, labels: Path, out: Path) -> tuple[Path, Path, np.ndarray]:
    """Left half (training) as TIFF files; the right half's image and semantic masks."""
    from nahtlos.io import instances_to_semantic

    img, lab = tifffile.imread(image), tifffile.imread(labels)
    half = img.shape[1] // 2
    out.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(out / "left.tif", img[:, :half])
    tifffile.imwrite(out / "left_labels.tif", lab[:, :half])
    tifffile.imwrite(out / "right.tif", img[:, half:])
    # classes of the whole label image, cropped: no boundaries invented at the cut
    truth = instances_to_semantic(lab)[:, :, half:]
    return out / "left.tif", out / "right.tif", truth


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    inter = np.logical_and(pred, truth).sum()
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else 2.0 * inter / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("build/nuclei"))
    p.add_argument("--seeds", default="0")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="defaults")
    p.add_argument("--norms", default="batchrenorm,instance")
    args = p.parse_args()
    left, right, truth = _halves(args.image, args.labels, args.out)
    rows = []
    for seed in args.seeds.split(","):
        for norm in args.norms.split(","):
            run = args.out / f"{args.recipe}-{norm}-seed{seed}"
            t0 = time.perf_counter()
            if not (run / "model.pt").exists():
                _nahtlos(
                    "train",
                    "--image",
                    str(left),
                    "--labels",
                    str(args.out / "left_labels.tif"),
                    "--out",
                    str(run),
                    "--dims",
                    "2",
                    "--norm",
                    norm,
                    "--steps",
                    "300",
                    "--patch",
                    "128,128",
                    "--set",
                    f"train.seed={seed}",
                    "--no-progress",
                    *RECIPES[args.recipe],
                )
            seconds = time.perf_counter() - t0
            pred_path = run / "right-prediction.npy"
            _nahtlos(
                "predict",
                str(run / "model.pt"),
                str(right),
                str(pred_path),
                "--overwrite",
                "--no-progress",
            )
            pred = np.load(pred_path) > 0.5  # (boundaries, foreground, background)
            rows.append((norm, seed, _dice(pred[1], truth[1]), _dice(pred[0], truth[0]), seconds))
            print(
                f"{norm} seed {seed}: foreground {rows[-1][2]:.3f}, boundaries {rows[-1][3]:.3f}",
                flush=True,
            )
    print(
        f"\nrecipe: {args.recipe}; right half of {args.image.name}, Dice of the thresholded (0.5) prediction\n"
    )
    print("| norm | seed | foreground Dice | boundary Dice | training s |")
    print("|---|---:|---:|---:|---:|")
    for norm, seed, fg, bd, s in rows:
        print(f"| {norm} | {seed} | {fg:.3f} | {bd:.3f} | {s:.0f} |")
    for norm in args.norms.split(","):
        mine = [r for r in rows if r[0] == norm]
        print(
            f"| {norm} | mean | {np.mean([r[2] for r in mine]):.3f} | {np.mean([r[3] for r in mine]):.3f} | |"
        )


if __name__ == "__main__":
    main()

"""Recalibration methods on a 3D network: Dice on the demo's region before and after.

Takes a BatchRenorm (or BatchNorm) checkpoint trained on the synthetic 3D embryo (by
default the one ``make demo`` ships) and replaces its running statistics by each method of
``nahtlos.training.recalibrate`` over patches of its training volume (``nahtlos synth
embryo --shape 128,384,384 --seed 1``, as in ``make pretrained``):

* ``ema``: as trained (the moving averages);
* ``layerwise``, ``pooled``, ``precise``: over N random training-size patches;
* ``whole``: pooled over non-overlapping tiles covering the training volume (whole-volume
  statistics); ``whole, layerwise``: the same tiles, per-tile statistics averaged.

Each is evaluated like ``make demo``: eval-mode Dice per class on the central 64x256x256
voxels of the demo volume (seed 0, 128x512x1024; input percentiles of the whole volume),
thresholded at 0.5, with InstanceNorm's figures of the same region beside it.

    python benchmarks/recalibration_3d.py [--model PATH] [--patches 32] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from nahtlos.analysis.metrics import binarize, dice_per_channel
from nahtlos.engine.predict import predict_whole
from nahtlos.io import instances_to_semantic, open_image
from nahtlos.nets.checkpoint import load_model
from nahtlos.paper.demo import DEMO_REGION, DEMO_SHAPE
from nahtlos.paper.pretrained import pretrained_path
from nahtlos.paper.synth import write_synthetic
from nahtlos.training.recalibrate import image_patches, population_statistics


def _volume(path: Path, shape: tuple[int, ...], seed: int) -> Path:
    if not (path / "zarr.json").exists():
        write_synthetic("embryo", path, shape, seed=seed, overwrite=True, progress=False)
    return path


def _region(shape: tuple[int, ...], size: tuple[int, ...], align: int = 4) -> tuple[slice, ...]:
    return tuple(
        slice((n - s) // 2 // align * align, (n - s) // 2 // align * align + s)
        for n, s in zip(shape, size, strict=True)
    )


def _dice(model: torch.nn.Module, loaded, x, truth) -> list[float]:
    act = loaded.output_transform()
    pred = predict_whole(
        model,
        x,
        loaded.metadata["halo"],
        loaded.metadata["alignment"],
        ndim=3,
        output_transform=act,
    )
    scores = dice_per_channel(binarize(pred), truth, skip_empty_target=True)
    return [float("nan") if s is None else float(s) for s in scores]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", type=Path, default=None, help="default: the shipped embryo-batchrenorm"
    )
    p.add_argument(
        "--reference", type=Path, default=None, help="default: the shipped embryo-instance"
    )
    p.add_argument("--out", type=Path, default=Path("build/recalibration-3d"))
    p.add_argument("--patches", type=int, default=32)
    p.add_argument("--seeds", default="0,1,2", help="seeds of the patch positions")
    args = p.parse_args()
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    demo = open_image(_volume(args.out / "demo.ome.zarr", DEMO_SHAPE, 0))
    labels = open_image(args.out / "demo.ome.zarr", "labels/instances/0")
    train_image = open_image(_volume(args.out / "train.ome.zarr", (128, 384, 384), 1))
    region = _region(tuple(demo.shape), DEMO_REGION)
    truth = instances_to_semantic(np.asarray(labels[region]).astype(np.int64))
    loaded = load_model(args.model or pretrained_path("embryo-batchrenorm"))
    reference = load_model(args.reference or pretrained_path("embryo-instance"))
    classes = loaded.metadata["classes"]
    patch = tuple(loaded.metadata.get("window") or (64, 64, 64))
    transform = loaded.input_transform(train_image, 3)
    # both networks scale the input by the same percentiles of the whole demo volume
    x = loaded.input_transform(demo, 3)(np.asarray(demo[region], np.float32))
    rows = [("InstanceNorm (reference)", "-", _dice(reference.module, reference, x, truth), 0.0)]
    rows.append(("as trained", "-", _dice(loaded.module, loaded, x, truth), 0.0))
    tiles = image_patches([train_image], 3, patch, "all", input_transform=transform)
    for seed in args.seeds.split(","):
        patches = image_patches(
            [train_image], 3, patch, args.patches, seed=int(seed), input_transform=transform
        )
        for method, source in (
            ("layerwise", patches),
            ("pooled", patches),
            ("precise", patches),
            ("whole", tiles),
            ("whole, layerwise", tiles),
        ):
            if method.startswith("whole") and seed != args.seeds.split(",")[0]:
                continue  # the same tiles for every seed
            model = copy.deepcopy(loaded.module)
            t0 = time.perf_counter()
            batch = 2 if method == "precise" else 4  # precise: the training batch
            how = {"whole": "pooled", "whole, layerwise": "layerwise"}.get(method, method)
            population_statistics(model, source, how, batch_size=batch)
            seconds = time.perf_counter() - t0
            rows.append((method, seed, _dice(model, loaded, x, truth), seconds))
            print(rows[-1], flush=True)
    fg, bd = classes.index("foreground"), classes.index("boundaries")
    print(f"\n{args.model or 'embryo-batchrenorm (shipped)'}; {args.patches} patches of {patch}")
    print("\n| statistics | patch seed | foreground | boundaries | background | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seed, d, s in rows:
        print(
            f"| {name} | {seed} | {d[fg]:.3f} | {d[bd]:.3f} | {d[classes.index('background')]:.3f} | {s:.1f} |"
        )
    for method in ("layerwise", "pooled", "precise"):
        mine = [r[2] for r in rows if r[0] == method]
        if mine:
            print(
                f"| {method}, mean | | {np.mean([d[fg] for d in mine]):.3f} | {np.mean([d[bd] for d in mine]):.3f} | | |"
            )


if __name__ == "__main__":
    main()

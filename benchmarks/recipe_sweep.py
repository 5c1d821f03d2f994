"""Choose the training defaults by measurement: a screening sweep of the recipe in 2D.

Trains small U-Nets on the three synthetic 2D datasets (organoids, plants, embryo) with
BatchRenorm and with its peer InstanceNorm, on the same data, steps and seeds, and
varies one part of the recipe per stage:

* ``loss``: loss (dice, dice_bce) x learning-rate schedule (constant, poly, cosine);
* ``sampling``: ``data.foreground_bias`` (0, 1/3, 2/3), with --loss/--schedule fixed;
* ``renorm``: BatchRenorm's warm-up/ramp fractions and momentum (BatchRenorm only);
* ``confirm``: the chosen defaults, BatchRenorm / InstanceNorm / BatchNorm.

Every BatchNorm/BatchRenorm network is evaluated as trained (moving averages) and after
each recalibration method (``nahtlos.training.recalibrate``: layerwise, pooled, precise on
32 training patches, and pooled over tiles covering the training images = whole-image
statistics). Dice per class is block-wise on two held-out images (eval mode, median over
the images, as in training); train/eval disparity likewise. Rows go to ``sweep.csv``; a
re-run skips the rows it has. ``--report`` prints the tables (seed means) and draws
``sweep.png``.

    python benchmarks/recipe_sweep.py --out build/sweep --stage loss
    python benchmarks/recipe_sweep.py --out build/sweep --stage sampling --loss dice_bce --schedule poly
    python benchmarks/recipe_sweep.py --out build/sweep --report
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("organoids", "plants", "embryo")
REPORTED = ("foreground", "boundaries")
VARIANTS = ("ema", "layerwise", "pooled", "precise", "whole", "whole-layerwise")


# ------------------------------------------------------------------------------ runs


def _runs(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The runs of a stage: dicts of the recipe fields that vary."""
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = args.datasets.split(",")
    base = {"loss": args.loss, "schedule": args.schedule, "fg": args.fg, "warm": 0.2}
    base |= {"ramp": 0.2, "momentum": 0.01}
    if args.stage == "loss":
        grid = [
            {"norm": n, "loss": lo, "schedule": s}
            for n in ("batchrenorm", "instance")
            for lo in args.losses.split(",")
            for s in args.schedules.split(",")
        ]
    elif args.stage == "sampling":
        grid = [
            {"norm": n, "fg": f} for n in ("batchrenorm", "instance") for f in (0.0, 0.33, 0.67)
        ]
    elif args.stage == "renorm":
        grid = [
            {"norm": "batchrenorm", "warm": w, "ramp": r, "momentum": m}
            for (w, r) in ((0.1, 0.1), (0.2, 0.2), (0.4, 0.3))
            for m in (0.01, 0.05)
        ]
    else:  # confirm
        grid = [{"norm": n} for n in ("batchrenorm", "instance", "batch")]
    for seed, dataset, change in itertools.product(seeds, datasets, grid):
        yield {**base, **change, "dataset": dataset, "seed": seed, "steps": args.steps}


def _key(run: dict[str, Any]) -> str:
    fields = ("dataset", "norm", "loss", "schedule", "fg", "warm", "ramp", "momentum", "seed")
    return "|".join(str(run[f]) for f in (*fields, "steps"))


def _data(root: Path, dataset: str) -> dict[str, list[dict[str, str]]]:
    """Two 384x384 training and two 256x256 validation images (written once)."""
    from nahtlos.paper.synth import write_synthetic

    folder = root / "data" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[dict[str, str]]] = {"train": [], "val": []}
    suffix = "_semantic.tif" if dataset == "organoids" else "_labels.tif"
    plan = [("train", i, i, (384, 384)) for i in range(2)]
    plan += [("val", i, 1000 + i, (256, 256)) for i in range(2)]
    for split, i, seed, shape in plan:
        image = folder / f"{split}-{i}.tif"
        labels = folder / f"{split}-{i}{suffix}"
        if not labels.exists():
            write_synthetic(
                dataset, image, shape, seed=seed, format="tif", overwrite=True, progress=False
            )
        files[split].append({"image": str(image), "labels": str(labels)})
    return files


def _config(run: dict[str, Any], files: dict[str, Any], out: Path) -> Any:
    from nahtlos.training.config import validate_config

    organoids = run["dataset"] == "organoids"
    steps = run["steps"]
    data = {
        "train": files["train"],
        "val": files["val"],
        "labels": "semantic" if organoids else "instances",
        "num_classes": 3 if organoids else None,
        "patch": [96, 96],
        "foreground_bias": run["fg"],
    }
    train = {
        "steps": steps,
        "batch_size": 1,
        "accumulate": 2,
        "lr": 1e-3,
        "lr_schedule": run["schedule"],
        "loss": run["loss"],
        "seed": run["seed"],
        "renorm": {
            "warmup_steps": round(run["warm"] * steps),
            "ramp_steps": round(run["ramp"] * steps),
        },
        "recalibrate": 0,  # every method is measured below on the same network
        "val_every": steps,
        "val_block": [72, 72],
        "val_batch_size": 4,
        "checkpoint_every": steps,
        "device": "cpu",
    }
    model = {
        "ndim": 2,
        "norm": run["norm"],
        "channels": [16, 32, 64],
        "momentum": run["momentum"],
    }
    return validate_config({"data": data, "model": model, "train": train, "out": str(out)})


def _class_names(dataset: str) -> tuple[str, ...]:
    from nahtlos.io import SEMANTIC_CLASSES
    from nahtlos.paper.synth import class_names

    return class_names(dataset) if dataset == "organoids" else SEMANTIC_CLASSES


def _evaluate(model: Any, meta: dict[str, Any], config: Any, vols: list[Any]) -> dict[str, Any]:
    from nahtlos.training.validation import validate

    return validate(
        model,
        vols,
        block=meta["block"],
        halo=meta["halo"],
        alignment=meta["alignment"],
        activation=config.model.activation,
        labels=config.data.labels,
        num_classes=config.data.num_classes,
        batch_size=4,
    )


def _one(
    run: dict[str, Any], root: str, skip: frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """Train one network (unless its run folder has it) and evaluate it as trained and
    after each recalibration method not in ``skip``."""
    import torch

    from nahtlos.nets.checkpoint import load_model
    from nahtlos.training.data import PatchSampler, open_volume
    from nahtlos.training.loop import train
    from nahtlos.training.recalibrate import (
        population_statistics,
        running_stat_layers,
        volume_tiles,
    )

    torch.set_num_threads(1)
    files = _data(Path(root), run["dataset"])
    out = Path(root) / "runs" / _key(run).replace("|", "_")
    config = _config(run, files, out)
    t0 = time.perf_counter()
    checkpoint = out / "model.pt"
    if not checkpoint.exists():
        checkpoint = train(config, progress=False).checkpoint
    seconds = time.perf_counter() - t0
    loaded = load_model(checkpoint)
    meta = loaded.metadata
    norm = config.data.input_norm.build()
    vols = [open_volume(f["image"], f["labels"], 2, input_norm=norm) for f in files["val"]]
    train_vols = [open_volume(f["image"], f["labels"], 2, input_norm=norm) for f in files["train"]]
    names = _class_names(run["dataset"])
    variants = ["ema"]
    if running_stat_layers(loaded.module):
        variants += ["layerwise", "pooled", "precise", "whole", "whole-layerwise"]
    sampler = PatchSampler(
        train_vols,
        config.data.patch,
        labels=config.data.labels,
        num_classes=config.data.num_classes,
        foreground_bias=config.data.foreground_bias,
        flips=False,
        seed=run["seed"] + 1,
    )
    patches = [sampler.sample()[0] for _ in range(32)]
    rows = []
    for variant in [v for v in variants if v not in skip]:
        model = copy.deepcopy(loaded.module)
        if variant.startswith("whole"):
            tiles = volume_tiles(train_vols, config.data.patch)
            how = "layerwise" if variant == "whole-layerwise" else "pooled"
            population_statistics(model, tiles, how, batch_size=8)
        elif variant != "ema":
            population_statistics(
                model, patches, variant, batch_size=1 if variant == "precise" else 8
            )
        scores = _evaluate(model, meta, config, vols)
        row = {**run, "variant": variant, "seconds": round(seconds, 1), "key": _key(run)}
        for kind in ("dice_eval", "dice_train", "disparity"):
            for n, v in zip(names, scores[kind], strict=True):
                row[f"{kind}_{n}"] = round(float(v), 4)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ driver


def _done(csv_path: Path) -> dict[str, frozenset[str]]:
    """The variants evaluated so far, per run key."""
    if not csv_path.exists():
        return {}
    found: dict[str, set[str]] = defaultdict(set)
    with csv_path.open(newline="") as f:
        for r in csv.DictReader(f):
            found[r["key"]].add(r["variant"])
    return {k: frozenset(v) for k, v in found.items()}


def _append(csv_path: Path, rows: list[dict[str, Any]]) -> None:
    columns = sorted({k for r in rows for k in r})
    existing: list[dict[str, str]] = []
    if csv_path.exists():
        with csv_path.open(newline="") as f:
            reader = csv.DictReader(f)
            existing = list(reader)
            columns = sorted(set(columns) | set(reader.fieldnames or []))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(existing + rows)


def sweep(args: argparse.Namespace) -> None:
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    csv_path = root / "sweep.csv"
    done = _done(csv_path)
    # a run is done when every variant is; BatchNorm-free runs have only "ema"
    todo = [
        r
        for r in _runs(args)
        if not done.get(_key(r), frozenset())
        >= (frozenset({"ema"}) if r["norm"] == "instance" else frozenset(VARIANTS))
    ]
    for d in {r["dataset"] for r in todo}:
        _data(root, d)  # once, before the workers race for it
    print(f"{len(todo)} runs to do ({len(done)} done), {args.workers} workers")
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        futures = {pool.submit(_one, r, str(root), done.get(_key(r), frozenset())): r for r in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            rows = fut.result()
            _append(csv_path, rows)
            r = futures[fut]
            elapsed = time.perf_counter() - t0
            print(
                f"[{i}/{len(todo)}] {_key(r)}  {rows[0]['seconds']} s  ({elapsed / 60:.1f} min)",
                flush=True,
            )


# ------------------------------------------------------------------------------ report


def _f(x: str) -> float:
    return float(x) if x not in ("", "nan") else float("nan")


def report(args: argparse.Namespace) -> None:
    """Seed means of foreground and boundary Dice, per recipe, dataset and variant."""
    root = Path(args.out)
    with (root / "sweep.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    groups: dict[tuple[str, ...], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        recipe = (
            r["norm"],
            r["loss"],
            r["schedule"],
            r["fg"],
            r["warm"],
            r["ramp"],
            r["momentum"],
            r["steps"],
        )
        groups[(*recipe, r["variant"], r["dataset"])].append(r)
    table: dict[tuple[str, ...], dict[str, tuple[float, float, float, int]]] = defaultdict(dict)
    for key, rs in groups.items():
        *recipe_variant, dataset = key
        fg = np.mean([_f(r["dice_eval_foreground"]) for r in rs])
        bd = np.mean([_f(r["dice_eval_boundaries"]) for r in rs])
        dis = np.mean(
            [np.nanmean([_f(v) for k, v in r.items() if k.startswith("disparity_")]) for r in rs]
        )
        table[tuple(recipe_variant)][dataset] = (fg, bd, dis, len(rs))
    head = "| norm | loss | schedule | fg bias | warm/ramp | momentum | steps | statistics |"
    datasets = [d for d in DATASETS if any(d in v for v in table.values())]
    head += "".join(f" {d} fg / bd |" for d in datasets) + " mean fg / bd | disparity |"
    print(head)
    print("|" + "---|" * (8 + len(datasets) + 2))
    for key in sorted(table):
        norm, loss, sched, fg, warm, ramp, mom, steps, variant = key
        cells = table[key]
        line = f"| {norm} | {loss} | {sched} | {fg} | {warm}/{ramp} | {mom} | {steps} | {variant} |"
        fgs, bds, dis = [], [], []
        for d in datasets:
            if d in cells:
                a, b, c, n = cells[d]
                fgs.append(a)
                bds.append(b)
                dis.append(c)
                line += f" {a:.3f} / {b:.3f} ({n}) |"
            else:
                line += " |"
        line += f" {np.mean(fgs):.3f} / {np.mean(bds):.3f} | {np.mean(dis):.3f} |"
        print(line)
    if args.figure:
        _figure(rows, root / "sweep.png")


def _figure(rows: list[dict[str, str]], path: Path) -> None:
    """One panel per decision: mean over datasets and seeds of foreground and boundary
    Dice (eval mode), BatchRenorm beside InstanceNorm (and BatchNorm where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def mean(norm: str, variant: str = "ema", **fields: Any) -> tuple[float, float]:
        sel = [
            r
            for r in rows
            if r["norm"] == norm
            and r["variant"] == variant
            and all(str(r[k]) == str(v) for k, v in fields.items())
        ]
        if not sel:
            return (float("nan"), float("nan"))
        return (
            float(np.mean([_f(r["dice_eval_foreground"]) for r in sel])),
            float(np.mean([_f(r["dice_eval_boundaries"]) for r in sel])),
        )

    base = {"loss": "dice_bce", "schedule": "constant", "fg": "0.33", "warm": "0.2"}
    base |= {"ramp": "0.2", "momentum": "0.01", "steps": "1200"}
    panels: list[tuple[str, list[tuple[str, str, str, dict[str, Any]]]]] = [
        (
            "loss x lr schedule (fg bias 0)",
            [
                (
                    f"{lo} {sc} {st}",
                    n,
                    "ema",
                    {**base, "loss": lo, "schedule": sc, "fg": "0.0", "steps": st},
                )
                for st in ("400", "1200")
                for lo in ("dice", "dice_bce")
                for sc in ("constant", "poly", "cosine")
                for n in ("batchrenorm", "instance")
                if lo == "dice_bce" or st == "400"
                if sc != "cosine" or st == "400"
            ],
        ),
        (
            "foreground bias",
            [
                (f"fg {fg}", n, "ema", {**base, "fg": fg})
                for fg in ("0.0", "0.33", "0.67")
                for n in ("batchrenorm", "instance")
            ],
        ),
        (
            "BatchRenorm warm-up/ramp, momentum",
            [
                (
                    f"{w}/{r} m{m}",
                    "batchrenorm",
                    "ema",
                    {**base, "warm": w, "ramp": r, "momentum": m},
                )
                for w, r in (("0.1", "0.1"), ("0.2", "0.2"), ("0.4", "0.3"))
                for m in ("0.01", "0.05")
            ],
        ),
        (
            "statistics after training",
            [
                (v, n, v, base)
                for n in ("batchrenorm", "batch")
                for v in ("ema", "layerwise", "pooled", "precise", "whole", "whole-layerwise")
            ],
        ),
    ]
    colors = {"batchrenorm": "C0", "instance": "C1", "batch": "C2"}
    fig, axes = plt.subplots(1, len(panels), figsize=(22, 7))
    for ax, (title, bars) in zip(axes, panels, strict=True):
        labels = []
        for k, (label, norm, variant, fields) in enumerate(bars):
            fg, bd = mean(norm, variant, **fields)
            ax.barh(k - 0.2, fg, 0.4, color=colors[norm], alpha=0.45)
            ax.barh(k + 0.2, bd, 0.4, color=colors[norm])
            labels.append(f"{label} [{norm}]")
        ax.set_yticks(range(len(bars)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0.3, 1.0)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(title, fontsize=10)
    handles = [matplotlib.patches.Patch(color=c, label=n) for n, c in colors.items()] + [
        matplotlib.patches.Patch(color="0.5", alpha=0.45, label="foreground (light)"),
        matplotlib.patches.Patch(color="0.5", label="boundaries (dark)"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=9)
    fig.suptitle("eval-mode Dice, mean over organoids, plants, embryo (2D) and 3 seeds")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--stage", choices=("loss", "sampling", "renorm", "confirm"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--loss", default="dice_bce")
    p.add_argument("--schedule", default="poly")
    p.add_argument("--fg", type=float, default=0.0)
    p.add_argument("--losses", default="dice,dice_bce", help="stage loss: the losses tried")
    p.add_argument("--schedules", default="constant,poly,cosine", help="stage loss: the schedules")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--report", action="store_true")
    p.add_argument("--figure", action="store_true")
    args = p.parse_args()
    if args.report:
        report(args)
    elif args.stage:
        sweep(args)
    else:
        p.error("give --stage or --report")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

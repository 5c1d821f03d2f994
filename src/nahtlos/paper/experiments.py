"""The paper's experiment grids, end to end: data, training, evaluation, tables, figures.

:func:`reproduce` runs the normalization grid of the paper (Buglakova et al., "Tiling
artifacts and trade-offs of feature normalization in the segmentation of large biological
images") on the synthetic datasets of :mod:`nahtlos.paper.synth`:

* **Table 1** (U-Net): BatchNorm with global and with tile-wise input normalization,
  InstanceNorm with global and tile-wise input normalization, BatchRenorm and Identity
  (global input normalization), for each dataset;
* **Table 2** (UNETR): BatchNorm, InstanceNorm, BatchRenorm, Identity;
* per cell: eval-mode and train-mode Dice per class (median over the validation images),
  train/eval disparity and tile mismatch (the indicator, "no" when seamless, and the
  magnitude per class) — :mod:`nahtlos.analysis.metrics` definitions;
* **transfer** (supplementary Table 1): the U-Net models trained on plants evaluated on
  embryo and vice versa;
* **tile-size sweep** (Fig. 6): eval-mode Dice against the inference window, one line per
  norm;
* **stitched predictions** (Fig. 2): one validation image per dataset predicted by every
  U-Net, with the difference between two tilings, so seams show where they exist;
* **whole-image statistics** (issue 9): the InstanceNorm U-Nets predicted tile-wise and
  with their norms frozen to exact whole-image statistics
  (:func:`nahtlos.engine.global_stats.compute_global_stats`).

A run writes into one folder::

    manifest.json              the preset, the grid geometry (halo, blocks) and nahtlos version
    data/<dataset>/            train-<i>.tif, val-<i>.tif and their label files
    cells/<cell>/train/        the training run (nahtlos.training.loop: checkpoints, logs, curves)
    cells/<cell>/result.json   the cell's numbers; its presence means "cell done"
    cells/<cell>/stitched.npz  arrays of the stitched-prediction figure
    results.csv  sweep.csv  global_stats.csv      every number, one row per evaluation
    tables.md                  the tables in the paper's layout
    sweep.png  stitched-<dataset>.png             the figures

**Resume.** A cell is done when its ``result.json`` exists with the fingerprint of the
preset; a re-run skips it. An interrupted training continues from its last checkpoint
(bit-identical on CPU with the same thread count, see :mod:`nahtlos.training.loop`), and the
tables are always rebuilt from the result files, so an interrupted and resumed run gives
the same tables as one that was never interrupted.

Two presets: ``quick`` (2D, small networks, the whole grid in well under an hour on two
CPU cores) and ``paper`` (the paper's 3D sizes: patches of 96³, 25 000 optimizer steps of
1 x 8 accumulated patches; meant for GPUs).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..axes import round_up
from ..errors import NahtlosError

__all__ = [
    "PRESETS",
    "TABLE1_NORMS",
    "TABLE2_NORMS",
    "ArchPreset",
    "Cell",
    "ExperimentError",
    "Preset",
    "ReproduceResult",
    "grid",
    "read_csv",
    "reproduce",
    "shared_training",
    "tables_markdown",
    "write_csv",
]

# (feature norm, input normalization) of each column, in the paper's order.
TABLE1_NORMS: tuple[tuple[str, str], ...] = (
    ("batch", "global"),
    ("batch", "tilewise"),
    ("instance", "global"),
    ("instance", "tilewise"),
    ("batchrenorm", "global"),
    ("identity", "global"),
)
"""The columns of the paper's Table 1 (U-Net): ``(norm, input normalization)``."""

TABLE2_NORMS: tuple[tuple[str, str], ...] = (
    ("batch", "global"),
    ("instance", "global"),
    ("batchrenorm", "global"),
    ("identity", "global"),
)
"""The columns of the paper's Table 2 (UNETR)."""

TRANSFER_DATASETS = ("plants", "embryo")
"""Models trained on one of these are evaluated on the other (supplementary Table 1)."""

_NORM_LABEL = {
    "batch": "BatchNorm",
    "instance": "InstanceNorm",
    "batchrenorm": "BatchRenorm",
    "identity": "Identity",
}
_FEATURE_NORM = {
    "batch": "global",
    "instance": "tile-wise",
    "batchrenorm": "global",
    "identity": "global",
}
_INPUT_LABEL = {"global": "global", "tilewise": "tile-wise"}
# the classes the paper reports per dataset, in its row order
_REPORTED = {
    "organoids": ("foreground", "boundaries", "matrix"),
    "plants": ("foreground", "boundaries"),
    "embryo": ("foreground", "boundaries"),
}
_ARCH_LABEL = {"unet": "U-Net", "unetr": "UNETR"}


class ExperimentError(NahtlosError, ValueError):
    """An invalid preset, grid selection, or an output folder of another run."""


# ------------------------------------------------------------------------------ presets


@dataclass(frozen=True)
class ArchPreset:
    """Training of one architecture within a preset.

    Attributes
    ----------
    patch
        Training patch; for the U-Net also the inference window (the block is the
        patch minus the halo on both sides, so the network sees windows of the size it
        was trained on, as in the paper); for the UNETR its fixed window.
    model
        Fields of :class:`nahtlos.training.config.ModelConfig` (widths, UNETR sizes).
    steps, batch_size, accumulate, lr
        Optimizer steps, patches per forward pass (the batch BatchNorm sees), forward
        passes accumulated per step, Adam learning rate.
    warmup_steps, ramp_steps
        BatchRenorm: plain BatchNorm for ``warmup_steps``, then r_max/d_max ramp
        linearly to 3/5 over ``ramp_steps``; the remaining steps train at full bounds.
    """

    patch: tuple[int, ...]
    model: Mapping[str, Any]
    steps: int
    batch_size: int
    accumulate: int
    lr: float
    warmup_steps: int
    ramp_steps: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**dataclasses.asdict(self), "patch": list(self.patch), "model": dict(self.model)}


@dataclass(frozen=True)
class Preset:
    """Everything that defines a run of the grid (its fingerprint is stored with results).

    Attributes
    ----------
    name
        ``quick``, ``paper`` or a custom name.
    ndim
        2 or 3.
    datasets
        Synthetic datasets (:data:`nahtlos.paper.synth.SYNTHETIC_DATASETS`).
    train_shape, n_train, val_shape, n_val
        Shape and number of the training and validation images of each dataset
        (seeds ``seed + i`` and ``seed + 1000 + i``).
    unet, unetr
        Training of each architecture.
    mismatch_stride
        Grid stride of the tile-mismatch windows (64 in the paper).
    sweep_windows
        Inference windows of the tile-size sweep (U-Net); the whole image is added.
    checkpoint_every, val_every
        Checkpoint interval (the resume granularity) and validation interval of training.
    workers, threads
        Cells trained in parallel (processes) and torch threads per process (0: torch's
        default).
    device
        ``auto``, ``cpu`` or ``cuda``.
    """

    name: str
    ndim: int
    datasets: tuple[str, ...]
    train_shape: tuple[int, ...]
    n_train: int
    val_shape: tuple[int, ...]
    n_val: int
    unet: ArchPreset
    unetr: ArchPreset
    mismatch_stride: int = 64
    sweep_windows: tuple[int, ...] = ()
    checkpoint_every: int = 200
    val_every: int = 300
    workers: int = 1
    threads: int = 0
    device: str = "auto"
    seed: int = 0
    anisotropy: float = 1.0

    def arch(self, name: str) -> ArchPreset:
        """The settings of architecture ``name``."""
        if name not in ("unet", "unetr"):
            raise ExperimentError(f"unknown architecture {name!r}; choose unet or unetr")
        return self.unet if name == "unet" else self.unetr

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in the manifest)."""
        d = dataclasses.asdict(self)
        d["unet"], d["unetr"] = self.unet.to_dict(), self.unetr.to_dict()
        for k in ("datasets", "train_shape", "val_shape", "sweep_windows"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Preset:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        for k in ("unet", "unetr"):
            a = dict(d[k])
            a["patch"] = tuple(a["patch"])
            d[k] = ArchPreset(**a)
        for k in ("datasets", "train_shape", "val_shape", "sweep_windows"):
            d[k] = tuple(d[k])
        return cls(**d)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not workers, threads or device)."""
        d = self.to_dict()
        for k in ("workers", "threads", "device", "name"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Why the quick preset looks like this (2 CPU cores, under 40 minutes for 30 trainings):
# * batch size 1, as in the paper: BatchNorm's statistics of a single patch are what make
#   its running averages unrepresentative (the source of train/eval disparity); the
#   gradient is accumulated over 4 patches instead of the paper's 8 to halve the cost.
# * BatchRenorm: a BatchNorm warm-up of 40% of the steps (1920 patches: the running
#   statistics, momentum 0.01, keep e^-19 of their initial values, and the loss has
#   levelled off), a ramp over 30% and 30% at full r_max = 3, d_max = 5. The paper
#   stresses that training must converge before the switch and that it be gradual.
# * small widths (U-Net 16-32-64, the paper's depth; UNETR hidden size 96 instead of 768).
QUICK = Preset(
    name="quick",
    ndim=2,
    datasets=("organoids", "plants", "embryo"),
    train_shape=(512, 512),
    n_train=2,
    val_shape=(384, 384),
    n_val=2,
    unet=ArchPreset(
        patch=(96, 96),
        model={"channels": [16, 32, 64], "strides": [2, 2]},
        steps=1200,
        batch_size=1,
        accumulate=4,
        lr=1e-3,
        warmup_steps=480,
        ramp_steps=360,
    ),
    unetr=ArchPreset(
        patch=(64, 64),
        model={"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4},
        steps=600,
        batch_size=1,
        accumulate=4,
        lr=1e-3,
        warmup_steps=240,
        ramp_steps=180,
    ),
    mismatch_stride=64,
    sweep_windows=(48, 64, 96, 128, 192, 288),
    checkpoint_every=200,
    val_every=300,
    workers=2,
    threads=1,
    device="cpu",
)

PAPER = Preset(
    name="paper",
    ndim=3,
    datasets=("organoids", "plants", "embryo"),
    train_shape=(160, 320, 320),
    n_train=4,
    val_shape=(160, 320, 320),
    n_val=2,
    unet=ArchPreset(
        patch=(96, 96, 96),
        model={"channels": [32, 64, 128], "strides": [2, 2]},
        steps=25000,
        batch_size=1,
        accumulate=8,
        lr=1e-3,
        warmup_steps=10000,
        ramp_steps=7500,
    ),
    unetr=ArchPreset(
        patch=(96, 96, 96),
        model={"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
        steps=25000,
        batch_size=1,
        accumulate=8,
        lr=1e-3,
        warmup_steps=10000,
        ramp_steps=7500,
    ),
    mismatch_stride=64,
    sweep_windows=(48, 64, 96, 128, 160, 224),
    checkpoint_every=1000,
    val_every=2500,
    workers=1,
    threads=0,
    device="auto",
)

PRESETS: dict[str, Preset] = {"quick": QUICK, "paper": PAPER}
"""The named presets of ``nahtlos reproduce --preset``."""


# --------------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Cell:
    """One trained network of the grid: architecture, dataset, feature and input norm."""

    arch: str
    dataset: str
    norm: str
    input_norm: str

    @property
    def key(self) -> str:
        """Folder name, e.g. ``unet-plants-batch-global``."""
        return f"{self.arch}-{self.dataset}-{self.norm}-{self.input_norm}"

    @property
    def column(self) -> tuple[str, str]:
        """``(norm, input_norm)``: the table column."""
        return (self.norm, self.input_norm)

    @property
    def label(self) -> str:
        """E.g. ``BatchNorm (tile-wise input)``."""
        return f"{_NORM_LABEL[self.norm]} ({_INPUT_LABEL[self.input_norm]} input)"


def grid(
    preset: Preset,
    archs: Sequence[str] = ("unet", "unetr"),
    datasets: Sequence[str] | None = None,
) -> list[Cell]:
    """The cells of Table 1 (``unet``) and Table 2 (``unetr``) for the chosen datasets."""
    from .synth import SYNTHETIC_DATASETS

    chosen = tuple(datasets) if datasets is not None else preset.datasets
    for d in chosen:
        if d not in SYNTHETIC_DATASETS:
            raise ExperimentError(
                f"unknown dataset {d!r}; choose from {', '.join(SYNTHETIC_DATASETS)}"
            )
    cells: list[Cell] = []
    for arch in archs:
        columns = {"unet": TABLE1_NORMS, "unetr": TABLE2_NORMS}.get(arch)
        if columns is None:
            raise ExperimentError(f"unknown architecture {arch!r}; choose unet or unetr")
        for d in chosen:
            cells.extend(Cell(arch, d, n, i) for n, i in columns)
    return cells


# --------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class _Image:
    image: str
    labels: str


def _class_names(dataset: str) -> tuple[str, ...]:
    """Channel names of the network output for ``dataset``."""
    from ..io import SEMANTIC_CLASSES
    from .synth import class_names

    # organoids: semantic ground truth 0 matrix, 1 foreground, 2 boundaries (one-hot in
    # that order); plants/embryo: instances -> boundaries, foreground, background
    return class_names(dataset) if dataset == "organoids" else SEMANTIC_CLASSES


def _dataset_files(out: Path, preset: Preset, dataset: str) -> dict[str, list[_Image]]:
    """Write (once) and name the training and validation images of ``dataset``."""
    from .synth import write_synthetic

    folder = out / "data" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[_Image]] = {"train": [], "val": []}
    plan = [("train", i, preset.seed + i, preset.train_shape) for i in range(preset.n_train)]
    plan += [("val", i, preset.seed + 1000 + i, preset.val_shape) for i in range(preset.n_val)]
    for split, i, seed, shape in plan:
        path = folder / f"{split}-{i}.tif"
        labels = folder / (
            f"{split}-{i}_semantic.tif" if dataset == "organoids" else f"{split}-{i}_labels.tif"
        )
        if not (path.exists() and labels.exists()):
            # written under temporary names and moved into place: never half-written
            write_synthetic(
                dataset,
                path,
                shape,
                seed=seed,
                anisotropy=preset.anisotropy,
                format="tif",
                overwrite=True,
                progress=False,
            )
        files[split].append(_Image(str(path), str(labels)))
    return files


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Geometry:
    """Prediction geometry of one architecture (the same for all its cells)."""

    halo: tuple[int, ...]
    alignment: tuple[int, ...]
    window: tuple[int, ...]  # the inference window = training patch

    @property
    def block(self) -> tuple[int, ...]:
        return tuple(w - 2 * h for w, h in zip(self.window, self.halo, strict=True))

    def mismatch_window(self) -> tuple[tuple[int, ...], int]:
        """Tile-mismatch window and overlap whose two sub-tiles are inference windows.

        Along the split (last) axis the window is ``2P - 2h - v`` for sub-tiles of
        length P = the inference window, halo h and valid overlap v (a quarter of P,
        aligned); :func:`nahtlos.analysis.metrics.tile_mismatch` then cuts sub-tiles of exactly P.
        """
        p, h, a = self.window[-1], self.halo[-1], self.alignment[-1]
        v = round_up(max(a, p // 4), a)
        w = 2 * p - 2 * h - v
        return (*self.window[:-1], w), v

    def to_dict(self) -> dict[str, Any]:
        return {
            "halo": list(self.halo),
            "alignment": list(self.alignment),
            "window": list(self.window),
            "block": list(self.block),
        }


def _geometry(preset: Preset, arch: str) -> _Geometry:
    """The halo of the paper: the TRF of the architecture with a global feature norm.

    For the U-Net the TRF radius of the same network with Identity norms, rounded up to
    its alignment (block-wise prediction is then exact for every global norm); the paper
    uses this halo for its InstanceNorm U-Nets too. For the UNETR (global attention) the
    halo crops a quarter of its window on every side.
    """
    from ..nets.models import build_model, model_alignment, unetr_halo

    a = preset.arch(arch)
    nd = preset.ndim
    if arch == "unetr":
        halo = unetr_halo(a.patch)
        align = (model_alignment("unetr"),) * nd
    else:
        from ..nets.receptive_field import receptive_field

        net = build_model("unet", nd, 1, 3, "identity", **dict(a.model))
        rf = receptive_field(net, nd, 1, erf_samples=1)
        halo = rf.halo()
        align = rf.alignment
    geo = _Geometry(tuple(halo), tuple(align), tuple(a.patch))
    if any(b < al for b, al in zip(geo.block, geo.alignment, strict=True)):
        raise ExperimentError(
            f"{arch} patch {a.patch} is too small for the halo {geo.halo}: the inference "
            f"block (patch - 2 x halo) would be {geo.block}; use a larger patch"
        )
    return geo


# ----------------------------------------------------------------------------- training


def _cell_config(
    preset: Preset, cell: Cell, files: Mapping[str, Sequence[_Image]], geo: _Geometry, run: Path
) -> Any:
    from ..training.config import validate_config

    a = preset.arch(cell.arch)
    organoids = cell.dataset == "organoids"
    data: dict[str, Any] = {
        "train": [{"image": f.image, "labels": f.labels} for f in files["train"]],
        "val": [{"image": f.image, "labels": f.labels} for f in files["val"]],
        "labels": "semantic" if organoids else "instances",
        "patch": list(a.patch),
        "flips": True,
        "input_norm": {"mode": cell.input_norm},
    }
    if organoids:
        data["num_classes"] = 3
    train: dict[str, Any] = {
        "steps": a.steps,
        "batch_size": a.batch_size,
        "accumulate": a.accumulate,
        "lr": a.lr,
        "seed": preset.seed,  # the same patches for every cell: only the norm differs
        "renorm": {"warmup_steps": a.warmup_steps, "ramp_steps": a.ramp_steps},
        "val_every": preset.val_every,
        "val_batch_size": 1,
        "checkpoint_every": preset.checkpoint_every,
        "device": preset.device,
    }
    if cell.arch == "unet":
        train["val_block"] = list(geo.block)
    model = {"arch": cell.arch, "ndim": preset.ndim, "norm": cell.norm, **dict(a.model)}
    return validate_config(
        {"data": data, "model": model, "train": train, "out": str(run)}, f"cell {cell.key}"
    )


def _checkpoint_step(path: Path) -> int:
    return int(path.stem.split("-")[-1])


def shared_training(preset: Preset, cell: Cell) -> Cell | None:
    """The cell whose trained network an InstanceNorm cell is, or ``None``.

    With one patch per forward pass, BatchNorm in training normalizes each channel with
    the mean and variance of that patch: exactly what (affine) InstanceNorm computes.
    Trained from the same seed on the same patches, the BatchNorm and InstanceNorm
    networks are therefore the same network (bit-identical weights on CPU; only
    BatchNorm's running averages are extra), and they differ only at inference. So the
    InstanceNorm cell reuses the BatchNorm cell's training, converted to InstanceNorm,
    instead of repeating it. With larger batches the two differ and both are trained.
    """
    if cell.norm == "instance" and preset.arch(cell.arch).batch_size == 1:
        return Cell(cell.arch, cell.dataset, "batch", cell.input_norm)
    return None


def _final_checkpoint(root: Path, preset: Preset, cell: Cell) -> Path:
    steps = preset.arch(cell.arch).steps
    return root / "cells" / cell.key / "train" / "checkpoints" / f"step-{steps:06d}.pt"


def _train_cell(
    root: Path, preset: Preset, cell: Cell, config: Any
) -> tuple[Path, int, float, str | None]:
    """Train (or resume, or skip) a cell.

    Returns the final checkpoint, the step training started from, its seconds, and the
    key of the cell whose training was reused (see :func:`shared_training`).
    """
    from ..errors import FormatError
    from ..nets.checkpoint import convert_checkpoint, read_checkpoint
    from ..training.loop import train

    steps = preset.arch(cell.arch).steps
    run = root / "cells" / cell.key / "train"
    final = _final_checkpoint(root, preset, cell)
    if final.exists():
        return final, steps, 0.0, None
    source = shared_training(preset, cell)
    if source is not None and _final_checkpoint(root, preset, source).exists():
        converted = run / f"from-{source.key}.pt"
        if not converted.exists():  # written atomically
            run.mkdir(parents=True, exist_ok=True)
            convert_checkpoint(_final_checkpoint(root, preset, source), converted, cell.norm)
        return converted, steps, 0.0, source.key
    resume: Path | None = None
    done = sorted(
        (p for p in (run / "checkpoints").glob("step-*.pt") if _checkpoint_step(p) < steps),
        key=_checkpoint_step,
    )
    for candidate in reversed(done):  # the newest checkpoint that reads back
        try:
            read_checkpoint(candidate)
        except (FormatError, OSError, RuntimeError):
            continue
        resume = candidate
        break
    run.mkdir(parents=True, exist_ok=True)
    # train() reports validation on stdout; keep it in the run folder, not the console
    with (run / "train.log").open("a") as log, contextlib.redirect_stdout(log):
        result = train(config, resume=resume, out_dir=run, progress=False)
    if not final.exists():
        raise ExperimentError(f"training of {cell.key} ended without {final}")
    return final, result.start_step, result.seconds, None


# --------------------------------------------------------------------------- evaluation


def _volumes(images: Sequence[_Image], ndim: int, input_norm: str) -> list[Any]:
    from ..io import InputNormalization
    from ..training.data import open_volume

    return [
        open_volume(f.image, f.labels, ndim, input_norm=InputNormalization(mode=input_norm))  # type: ignore[arg-type]
        for f in images
    ]


def _targets(vol: Any, dataset: str) -> np.ndarray:
    from ..training.data import semantic_target

    organoids = dataset == "organoids"
    return semantic_target(
        vol, vol.region, "semantic" if organoids else "instances", 3 if organoids else None
    ).astype(bool)


def _median(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.median(v)) if v else None


def _dice_scores(pred: np.ndarray, gt: np.ndarray) -> list[float | None]:
    from ..analysis.metrics import binarize, dice_per_channel

    return dice_per_channel(binarize(pred), gt, skip_empty_target=True)


def _mismatch(
    model: Any,
    vols: Sequence[Any],
    geo: _Geometry,
    stride: int,
    names: Sequence[str],
    activation: str,
) -> dict[str, Any]:
    """Tile mismatch over all validation images (windows pooled)."""
    from ..analysis.metrics import tile_mismatch

    window, overlap = geo.mismatch_window()
    tms = [
        tile_mismatch(
            model,
            vol.image,
            window=window,
            halo=geo.halo,
            alignment=geo.alignment,
            stride=stride,
            overlap=overlap,
            ndim=vol.ndim,
            activation=activation,
            input_transform=vol.normalization,
        )
        for vol in vols
    ]
    return {**_pooled_mismatch(tms, names), "window": list(window)}


def _pooled_mismatch(tms: Sequence[Any], names: Sequence[str]) -> dict[str, Any]:
    """Tile mismatch of several images as one: the largest indicator, and the mean
    ``1 - Dice`` per class over the windows of all images."""
    indicator = max((float(tm.indicator) for tm in tms), default=0.0)
    tolerance = float(tms[-1].tolerance) if tms else 1e-5
    windows = [w["one_minus_dice"] for tm in tms for w in tm.windows]
    per_channel = np.mean(np.array(windows, dtype=np.float64), axis=0) if windows else []
    return {
        "indicator": indicator,
        "seamless": bool(indicator <= tolerance),
        "tolerance": tolerance,
        "per_class": {n: float(v) for n, v in zip(names, per_channel, strict=True)},
        "windows": len(windows),
    }


def _evaluate_on(
    model: Any,
    meta: Mapping[str, Any],
    vols: Sequence[Any],
    dataset: str,
    geo: _Geometry,
    preset: Preset,
) -> dict[str, Any]:
    """Eval/train-mode Dice per class, disparity and tile mismatch on validation images."""
    from ..training.validation import validate

    organoids = dataset == "organoids"
    names = _class_names(dataset)
    scores = validate(
        model,
        vols,
        block=geo.block,
        halo=geo.halo,
        alignment=geo.alignment,
        activation=meta["activation"],
        labels="semantic" if organoids else "instances",
        num_classes=3 if organoids else None,
        batch_size=1,  # train mode normalizes each tile alone, as in training (batch 1)
    )

    def named(values: np.ndarray) -> dict[str, float | None]:
        return {
            n: (None if math.isnan(float(v)) else float(v))
            for n, v in zip(names, values, strict=True)
        }

    return {
        "classes": list(names),
        "dice_eval": named(scores["dice_eval"]),
        "dice_train": named(scores["dice_train"]),
        "disparity": named(scores["disparity"]),
        "mismatch": _mismatch(model, vols, geo, preset.mismatch_stride, names, meta["activation"]),
    }


def _sweep(
    model: Any,
    vols: Sequence[Any],
    targets: Sequence[np.ndarray],
    dataset: str,
    geo: _Geometry,
    windows: Sequence[int],
    activation: Any,
) -> list[dict[str, Any]]:
    """Eval-mode Dice per class for each inference window, and for the whole image."""
    from ..engine.predict import predict_blockwise, predict_whole

    names = _class_names(dataset)
    rows = []
    sizes: list[int | None] = [w for w in windows if w - 2 * max(geo.halo) >= max(geo.alignment)]
    for w in [*sizes, None]:
        per_image = []
        for vol, gt in zip(vols, targets, strict=True):
            if w is None:
                pred = predict_whole(
                    model,
                    vol.image,
                    geo.halo,
                    geo.alignment,
                    ndim=vol.ndim,
                    input_transform=vol.normalization,
                    output_transform=activation,
                )
            else:
                block = tuple(
                    round_up(w - 2 * h, a) for h, a in zip(geo.halo, geo.alignment, strict=True)
                )
                pred = np.asarray(
                    predict_blockwise(
                        model,
                        vol.image,
                        block,
                        geo.halo,
                        geo.alignment,
                        ndim=vol.ndim,
                        input_transform=vol.normalization,
                        output_transform=activation,
                        progress=False,
                    )
                )
            per_image.append(_dice_scores(pred, gt))
        dice = {
            n: _median(s[i] for s in per_image if s[i] is not None) for i, n in enumerate(names)
        }
        rows.append({"window": "whole" if w is None else int(w), "dice": dice})
    return rows


def _global_stats(
    model: Any,
    vols: Sequence[Any],
    targets: Sequence[np.ndarray],
    dataset: str,
    geo: _Geometry,
    preset: Preset,
    activation: Any,
    activation_name: str,
    tilewise: Mapping[str, Any],
) -> dict[str, Any]:
    """Issue 9: predict with the norms frozen to exact whole-image statistics.

    The halo of the frozen network is its local TRF (the receptive field with the
    norm statistics held constant), rounded up to the alignment.
    """
    from ..analysis.metrics import tile_mismatch
    from ..engine.global_stats import compute_global_stats, freeze_norms
    from ..engine.predict import predict_blockwise
    from ..nets.receptive_field import receptive_field

    t0 = time.perf_counter()
    rf = receptive_field(model, preset.ndim, 1, erf_samples=1)
    local = rf.local_trf_radius
    if local is None:
        raise ExperimentError(f"the {dataset} InstanceNorm model has no local receptive field")
    halo = tuple(round_up(r, a) for r, a in zip(local, geo.alignment, strict=True))
    frozen_geo = _Geometry(halo, geo.alignment, geo.window)
    names = _class_names(dataset)
    per_image: list[list[float | None]] = []
    tms = []
    mwin, overlap = geo.mismatch_window()
    for vol, gt in zip(vols, targets, strict=True):
        stats = compute_global_stats(
            model,
            vol.image,
            block=frozen_geo.block,
            halo=halo,
            alignment=geo.alignment,
            ndim=vol.ndim,
            input_transform=vol.normalization,
            progress=False,
        )
        frozen = freeze_norms(model, stats).eval()
        pred = np.asarray(
            predict_blockwise(
                frozen,
                vol.image,
                frozen_geo.block,
                halo,
                geo.alignment,
                ndim=vol.ndim,
                input_transform=vol.normalization,
                output_transform=activation,
                progress=False,
            )
        )
        per_image.append(_dice_scores(pred, gt))
        tms.append(
            tile_mismatch(
                frozen,
                vol.image,
                window=mwin,
                halo=halo,
                alignment=geo.alignment,
                stride=preset.mismatch_stride,
                overlap=overlap,
                ndim=vol.ndim,
                activation=activation_name,
                input_transform=vol.normalization,
            )
        )
    return {
        "halo": list(halo),
        "dice_tilewise": dict(tilewise["dice_eval"]),
        "mismatch_tilewise": dict(tilewise["mismatch"]),
        "dice_global": {
            n: _median(s[i] for s in per_image if s[i] is not None) for i, n in enumerate(names)
        },
        "mismatch_global": _pooled_mismatch(tms, names),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _stitched(
    model: Any, vol: Any, geo: _Geometry, activation: Any, crop: int = 256
) -> dict[str, np.ndarray]:
    """Arrays of the stitched-prediction figure for one image.

    Two tilings of the same image: the block grid from the origin, and the grid
    shifted by half a block (aligned). Where a network is seamless they agree exactly
    (away from the shifted image's new border, one halo wide); where it is not, their
    difference shows the tiles.
    """
    from ..engine.predict import predict_blockwise

    image = np.asarray(vol.image[...], dtype=np.float32)
    shift = tuple(round_up(b // 2, a) for b, a in zip(geo.block, geo.alignment, strict=True))

    def run(array: np.ndarray) -> np.ndarray:
        return np.asarray(
            predict_blockwise(
                model,
                array,
                geo.block,
                geo.halo,
                geo.alignment,
                ndim=vol.ndim,
                input_transform=vol.normalization,  # fitted on the whole image
                output_transform=activation,
                progress=False,
            )
        )

    first = run(image)
    shifted_in = image[tuple(slice(s, None) for s in shift)]
    second = run(np.ascontiguousarray(shifted_in))
    diff = np.full(first.shape[1:], np.nan, np.float32)
    inner = tuple(slice(s + h, None) for s, h in zip(shift, geo.halo, strict=True))
    inner2 = tuple(slice(h, None) for h in geo.halo)
    key1, key2 = (slice(None), *inner), (slice(None), *inner2)
    diff[inner] = np.abs(first[key1] - second[key2]).max(0)
    if vol.ndim == 3:  # the middle slice
        mid = first.shape[1] // 2
        image, first, diff = image[mid], first[:, mid], diff[mid]
    view = tuple(slice(0, min(crop, n)) for n in image.shape)
    key = (slice(None), *view)
    return {
        "image": image[view].astype(np.float32),
        "prediction": first[key].astype(np.float16),
        "difference": diff[view].astype(np.float16),
        "block": np.array(geo.block[-2:]),
        "shift": np.array(shift[-2:]),
        "halo": np.array(geo.halo[-2:]),
    }


def _cell_fingerprint(preset: Preset, cell: Cell) -> str:
    return hashlib.sha256(f"{preset.fingerprint()}/{cell.key}".encode()).hexdigest()[:16]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_cell(out: str, preset_dict: dict[str, Any], cell_dict: dict[str, str]) -> dict[str, Any]:
    """Train and evaluate one cell; writes ``cells/<key>/result.json`` and returns it.

    A module-level function of plain arguments, so that worker processes can run it.
    """
    import torch

    from ..nets.checkpoint import load_model
    from ..nets.state import activation_function

    preset = Preset.from_dict(preset_dict)
    cell = Cell(**cell_dict)
    if preset.threads > 0:
        torch.set_num_threads(preset.threads)
    root = Path(out)
    manifest = json.loads((root / "manifest.json").read_text())
    geo_d = manifest["geometry"][cell.arch]
    geo = _Geometry(tuple(geo_d["halo"]), tuple(geo_d["alignment"]), tuple(geo_d["window"]))
    folder = root / "cells" / cell.key
    folder.mkdir(parents=True, exist_ok=True)
    files = {d: _dataset_files(root, preset, d) for d in preset.datasets}
    config = _cell_config(preset, cell, files[cell.dataset], geo, folder / "train")
    ckpt, start, train_seconds, source = _train_cell(root, preset, cell, config)

    t0 = time.perf_counter()
    loaded = load_model(ckpt)
    model, meta = loaded.module.eval(), loaded.metadata
    act = activation_function(meta["activation"])
    evaluations: dict[str, Any] = {}
    own = _volumes(files[cell.dataset]["val"], preset.ndim, cell.input_norm)
    evaluations[cell.dataset] = _evaluate_on(model, meta, own, cell.dataset, geo, preset)
    if cell.arch == "unet" and cell.dataset in TRANSFER_DATASETS:
        for other in TRANSFER_DATASETS:
            if other != cell.dataset and other in files:
                vols = _volumes(files[other]["val"], preset.ndim, cell.input_norm)
                evaluations[other] = _evaluate_on(model, meta, vols, other, geo, preset)
    result: dict[str, Any] = {
        "cell": dataclasses.asdict(cell),
        "fingerprint": _cell_fingerprint(preset, cell),
        "steps": preset.arch(cell.arch).steps,
        "resumed_from": start if start > 0 else None,
        "train_seconds": round(train_seconds, 2),
        "weights_from": source,
        "geometry": geo.to_dict(),
        "evaluations": evaluations,
    }
    if cell.arch == "unet":
        targets = [_targets(v, cell.dataset) for v in own]
        result["sweep"] = _sweep(model, own, targets, cell.dataset, geo, preset.sweep_windows, act)
        if cell.norm == "instance" and cell.input_norm == "global":
            result["global_stats"] = _global_stats(
                model,
                own,
                targets,
                cell.dataset,
                geo,
                preset,
                act,
                meta["activation"],
                evaluations[cell.dataset],
            )
        arrays = _stitched(model, own[0], geo, act)
        np.savez_compressed(folder / "stitched.npz", **arrays)  # type: ignore[arg-type]
    result["eval_seconds"] = round(time.perf_counter() - t0, 2)
    _write_json(folder / "result.json", result)
    return result


def _load_result(root: Path, preset: Preset, cell: Cell) -> dict[str, Any] | None:
    path = root / "cells" / cell.key / "result.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("fingerprint") == _cell_fingerprint(preset, cell) else None


# ------------------------------------------------------------------------------- tables

_METRIC_PREFIXES = ("dice_eval_", "dice_train_", "disparity_", "mismatch_")


def result_rows(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cell, evaluated dataset) with every number, as written to CSV."""
    rows = []
    for res in results:
        cell = res["cell"]
        for dataset, ev in res["evaluations"].items():
            row: dict[str, Any] = {
                "arch": cell["arch"],
                "norm": cell["norm"],
                "input_norm": cell["input_norm"],
                "feature_norm": "tilewise" if cell["norm"] == "instance" else "global",
                "train_dataset": cell["dataset"],
                "eval_dataset": dataset,
            }
            for key in ("dice_eval", "dice_train", "disparity"):
                for cls, v in ev[key].items():
                    row[f"{key}_{cls}"] = v
            vals = [v for v in ev["disparity"].values() if v is not None]
            row["disparity_mean"] = float(np.mean(vals)) if vals else None
            mm = ev["mismatch"]
            row["mismatch_indicator"] = mm["indicator"]
            row["mismatch_seamless"] = mm["seamless"]
            for cls, v in mm["per_class"].items():
                row[f"mismatch_{cls}"] = v
            row["mismatch_windows"] = mm["windows"]
            row["steps"] = res["steps"]
            row["train_seconds"] = res["train_seconds"]
            row["eval_seconds"] = res.get("eval_seconds")
            rows.append(row)
    return rows


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    return cols


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows (dicts) as CSV; missing values are empty fields."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.partial")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, _columns(rows))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    os.replace(tmp, p)
    return p


def _parse(value: str) -> Any:
    if value == "":
        return None
    if value in ("True", "False"):
        return value == "True"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def read_csv(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read rows written by :func:`write_csv` back (numbers, booleans and blanks typed)."""
    with Path(path).open(newline="") as f:
        return [
            {k: _parse(v) for k, v in row.items() if _parse(v) is not None}
            for row in csv.DictReader(f)
        ]


def _fmt(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{float(v):.{digits}f}"


def _mismatch_text(row: Mapping[str, Any] | None, cls: str = "boundaries") -> str:
    if row is None:
        return "–"
    if row.get("mismatch_seamless"):
        return "no"
    return _fmt(row.get(f"mismatch_{cls}"))


def _indicator_text(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "–"
    if row.get("mismatch_seamless"):
        return "no"
    return f"{float(row['mismatch_indicator']):.2g}"


def _md(lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(cells) + " |" for cells in lines[1:]]
    return "\n".join(out)


def _find(
    rows: Sequence[Mapping[str, Any]], arch: str, column: tuple[str, str], train: str, ev: str
) -> Mapping[str, Any] | None:
    for r in rows:
        if (
            r["arch"] == arch
            and (r["norm"], r["input_norm"]) == column
            and r["train_dataset"] == train
            and r["eval_dataset"] == ev
        ):
            return r
    return None


def _header(columns: Sequence[tuple[str, str]], lead: int, repeat: int = 1) -> list[list[str]]:
    pad = [""] * (lead - 1)
    return [
        ["Normalization layer", *pad, *(_NORM_LABEL[n] for n, _ in columns for _ in range(repeat))],
        ["Input norm", *pad, *(_INPUT_LABEL[i] for _, i in columns for _ in range(repeat))],
        ["Feature norm", *pad, *(_FEATURE_NORM[n] for n, _ in columns for _ in range(repeat))],
    ]


def table_markdown(rows: Sequence[Mapping[str, Any]], arch: str, datasets: Sequence[str]) -> str:
    """Table 1 (``unet``) or Table 2 (``unetr``) in the paper's layout.

    Rows: eval-mode Dice and train-mode Dice per dataset and class, train/eval disparity
    (mean over classes), tile mismatch (the boundaries magnitude, "no" when the
    indicator is below its tolerance) and the indicator itself (largest |Δp|).
    """
    columns = TABLE1_NORMS if arch == "unet" else TABLE2_NORMS
    lines = _header(columns, 3)
    for key, title in (("dice_eval", "dice, eval mode"), ("dice_train", "dice, train mode")):
        for d in datasets:
            for i, cls in enumerate(_REPORTED[d]):
                lead = [title if d == datasets[0] and i == 0 else "", d if i == 0 else "", cls]
                vals = [(_find(rows, arch, c, d, d) or {}).get(f"{key}_{cls}") for c in columns]
                lines.append([*lead, *(_fmt(v) for v in vals)])
    for j, d in enumerate(datasets):
        vals = [(_find(rows, arch, c, d, d) or {}).get("disparity_mean") for c in columns]
        lines.append(["train/eval disparity" if j == 0 else "", d, "", *(_fmt(v) for v in vals)])
    for j, d in enumerate(datasets):
        cells = [_mismatch_text(_find(rows, arch, c, d, d)) for c in columns]
        lines.append(["tile mismatch (boundaries)" if j == 0 else "", d, "", *cells])
    for j, d in enumerate(datasets):
        cells = [_indicator_text(_find(rows, arch, c, d, d)) for c in columns]
        lines.append(["mismatch indicator, max abs. diff." if j == 0 else "", d, "", *cells])
    return _md(lines)


def transfer_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Supplementary Table 1: U-Nets trained on plants and on embryo, evaluated on both."""
    data = TRANSFER_DATASETS
    lines = _header(TABLE1_NORMS, 3, repeat=len(data))
    lines.append(["trained on", "", "", *(d for _ in TABLE1_NORMS for d in data)])
    for j, ev in enumerate(data):
        for i, cls in enumerate(_REPORTED[ev]):
            lead = ["dice, eval mode" if j == 0 and i == 0 else "", ev if i == 0 else "", cls]
            vals = [
                (_find(rows, "unet", c, tr, ev) or {}).get(f"dice_eval_{cls}")
                for c in TABLE1_NORMS
                for tr in data
            ]
            lines.append([*lead, *(_fmt(v) for v in vals)])
    for j, ev in enumerate(data):
        cells = [
            _mismatch_text(_find(rows, "unet", c, tr, ev)) for c in TABLE1_NORMS for tr in data
        ]
        lines.append(["tile mism. (boundaries)" if j == 0 else "", ev, "", *cells])
    return _md(lines)


def global_stats_rows(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue 9 rows: InstanceNorm U-Nets tile-wise vs with whole-image statistics."""
    rows = []
    for res in results:
        gs = res.get("global_stats")
        if not gs:
            continue
        for mode in ("tilewise", "global"):
            row: dict[str, Any] = {"dataset": res["cell"]["dataset"], "statistics": mode}
            for cls, v in gs[f"dice_{mode}"].items():
                row[f"dice_{cls}"] = v
            mm = gs[f"mismatch_{mode}"]
            row["mismatch_indicator"] = mm["indicator"]
            row["mismatch_seamless"] = mm["seamless"]
            for cls, v in mm["per_class"].items():
                row[f"mismatch_{cls}"] = v
            row["halo"] = "x".join(str(h) for h in (gs["halo"] if mode == "global" else []))
            row["seconds"] = gs["seconds"] if mode == "global" else None
            rows.append(row)
    return rows


def global_stats_markdown(rows: Sequence[Mapping[str, Any]], datasets: Sequence[str]) -> str:
    """Eval Dice and tile mismatch of the InstanceNorm U-Nets, tile-wise vs whole-image."""
    lines = [["dataset", "class", "Dice, tile statistics", "Dice, whole-image statistics"]]
    mism: list[list[str]] = []
    for d in datasets:
        by = {r["statistics"]: r for r in rows if r["dataset"] == d}
        if not by:
            continue
        for cls in _REPORTED[d]:
            lines.append(
                [d, cls, *(_fmt(by.get(m, {}).get(f"dice_{cls}")) for m in ("tilewise", "global"))]
            )
        mism.append(
            [
                d,
                "tile mismatch (boundaries) / indicator",
                *(
                    f"{_mismatch_text(by.get(m))} / {_indicator_text(by.get(m))}"
                    for m in ("tilewise", "global")
                ),
            ]
        )
    return _md(lines + mism)


def sweep_rows(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Tile-size sweep rows: one per (cell, window)."""
    rows = []
    for res in results:
        cell = res["cell"]
        for point in res.get("sweep", []):
            row: dict[str, Any] = {
                "dataset": cell["dataset"],
                "norm": cell["norm"],
                "input_norm": cell["input_norm"],
                "window": point["window"],
            }
            row.update({f"dice_{k}": v for k, v in point["dice"].items()})
            rows.append(row)
    return rows


def tables_markdown(
    rows: Sequence[Mapping[str, Any]],
    gs_rows: Sequence[Mapping[str, Any]] = (),
    datasets: Sequence[str] = ("organoids", "plants", "embryo"),
) -> str:
    """All tables of a run as one markdown document (what ``tables.md`` holds)."""
    present = [d for d in datasets if any(r["train_dataset"] == d for r in rows)]
    parts = []
    for arch, title in (
        ("unet", "Table 1: U-Net"),
        ("unetr", "Table 2: UNETR"),
    ):
        if any(r["arch"] == arch for r in rows):
            parts += [f"### {title}", "", table_markdown(rows, arch, present), ""]
    if any(r["train_dataset"] != r["eval_dataset"] for r in rows):
        parts += ["### Transfer (supplementary Table 1), U-Net", "", transfer_markdown(rows), ""]
    if gs_rows:
        parts += [
            "### InstanceNorm U-Net: tile statistics vs whole-image statistics",
            "",
            global_stats_markdown(gs_rows, present),
            "",
        ]
    return "\n".join(parts)


# ------------------------------------------------------------------------------ figures

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

    datasets = [d for d in _REPORTED if any(r["dataset"] == d for r in rows)]
    ncols = max(len(_REPORTED[d]) for d in datasets)
    ncols = max(ncols, 3)  # room for the legend
    fig, axes = plt.subplots(
        len(datasets), ncols, figsize=(3.3 * ncols, 2.6 * len(datasets) + 0.9), squeeze=False
    )
    numeric = sorted({int(r["window"]) for r in rows if r["window"] != "whole"})
    whole_x = numeric[-1] * 1.6 if numeric else 1.0
    for i, d in enumerate(datasets):
        for j in range(ncols):
            ax = axes[i][j]
            if j >= len(_REPORTED[d]):
                ax.axis("off")
                continue
            cls = _REPORTED[d][j]
            for column in TABLE1_NORMS:
                pts = [
                    (whole_x if r["window"] == "whole" else int(r["window"]), r.get(f"dice_{cls}"))
                    for r in rows
                    if r["dataset"] == d and (r["norm"], r["input_norm"]) == column
                ]
                pts = sorted(p for p in pts if p[1] is not None)
                if pts:
                    label = f"{_NORM_LABEL[column[0]]} ({_INPUT_LABEL[column[1]]} in)"
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

    names = _class_names(dataset)
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
        axes[0][k].set_title(f"{_NORM_LABEL[norm]}\n({_INPUT_LABEL[inp]} input)", fontsize=8)
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


# ------------------------------------------------------------------------------ runner


@dataclass
class ReproduceResult:
    """What :func:`reproduce` did and wrote."""

    out: Path
    cells: list[Cell]
    ran: list[str] = field(default_factory=list)  # keys of cells (re)computed now
    skipped: list[str] = field(default_factory=list)  # keys of cells already done
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)


def _check_manifest(root: Path, preset: Preset, overwrite: bool) -> None:
    path = root / "manifest.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    if old.get("fingerprint") == preset.fingerprint():
        return
    if overwrite:
        shutil.rmtree(root / "cells", ignore_errors=True)
        shutil.rmtree(root / "data", ignore_errors=True)
        return
    raise ExperimentError(
        f"output folder {str(root)!r} holds a run of another preset ({old.get('preset', {}).get('name')!r}, "
        f"fingerprint {old.get('fingerprint')}); use another --out, or --overwrite to start over"
    )


def _cost(preset: Preset, cell: Cell) -> float:
    a = preset.arch(cell.arch)
    per = 8.0 if cell.arch == "unetr" else 1.0  # relative cost of a forward/backward pass
    return a.steps * a.accumulate * a.batch_size * per * math.prod(a.patch)


def reproduce(
    preset: Preset | str = "quick",
    out: str | os.PathLike[str] = "nahtlos-reproduce",
    *,
    archs: Sequence[str] = ("unet", "unetr"),
    datasets: Sequence[str] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_cell_done: Callable[[Cell, dict[str, Any]], None] | None = None,
) -> ReproduceResult:
    """Run (or resume) the experiment grid and write its tables and figures.

    Parameters
    ----------
    preset
        ``"quick"``, ``"paper"`` or a :class:`Preset`.
    out
        Output folder; a folder of an earlier run of the same preset is resumed.
    archs
        ``unet`` (Table 1) and/or ``unetr`` (Table 2).
    datasets
        A subset of the preset's datasets (default all).
    workers
        Cells trained in parallel processes (default the preset's).
    overwrite
        Start over in a folder that holds a run of another preset.
    on_cell_done
        Called with each cell and its result as it completes.

    Returns
    -------
    ReproduceResult

    Raises
    ------
    ExperimentError
        For an unknown preset, dataset or architecture, or an ``out`` of another preset.
    """
    from .._version import __version__

    t_start = time.perf_counter()
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ExperimentError(f"unknown preset {preset!r}; choose {' or '.join(PRESETS)}")
        preset = PRESETS[preset]
    if datasets is not None:
        unknown = [d for d in datasets if d not in preset.datasets]
        if unknown:
            raise ExperimentError(
                f"dataset {unknown[0]!r} is not in preset {preset.name!r} "
                f"({', '.join(preset.datasets)})"
            )
    cells = grid(preset, archs, datasets)
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _check_manifest(root, preset, overwrite)
    n_workers = max(1, workers if workers is not None else preset.workers)

    for d in preset.datasets:  # all of them: the transfer evaluation needs the others
        _dataset_files(root, preset, d)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    geometry = dict(manifest.get("geometry", {}))
    for arch in archs:
        if arch not in geometry:
            geometry[arch] = _geometry(preset, arch).to_dict()
    _write_json(
        manifest_path,
        {
            "preset": preset.to_dict(),
            "fingerprint": preset.fingerprint(),
            "nahtlos": __version__,
            "geometry": geometry,
        },
    )

    result = ReproduceResult(root, cells)
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for cell in cells:
        done = _load_result(root, preset, cell)
        if done is not None:
            results[cell.key] = done
            result.skipped.append(cell.key)
        else:
            todo.append(cell)
    todo.sort(key=lambda c: -_cost(preset, c))  # longest first: better packing
    # cells that reuse another cell's training wait for it (see shared_training)
    waiting: dict[Cell, list[Cell]] = {}
    for cell in list(todo):
        source = shared_training(preset, cell)
        if source is not None and source in todo:
            waiting.setdefault(source, []).append(cell)
            todo.remove(cell)
    bar = tqdm(
        total=len(cells), initial=len(results), desc="reproduce", unit="cell", disable=not progress
    )
    pdict = preset.to_dict()

    def finished(cell: Cell, res: dict[str, Any]) -> None:
        results[cell.key] = res
        result.ran.append(cell.key)
        bar.update(1)
        bar.set_postfix_str(cell.key)
        if on_cell_done is not None:
            on_cell_done(cell, res)

    try:
        if n_workers == 1:
            queue = list(todo)
            while queue:
                cell = queue.pop(0)
                finished(cell, run_cell(str(root), pdict, dataclasses.asdict(cell)))
                queue.extend(waiting.pop(cell, []))
        else:
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")  # no fork of a threaded torch
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
                pending: dict[Future[dict[str, Any]], Cell] = {
                    pool.submit(run_cell, str(root), pdict, dataclasses.asdict(c)): c for c in todo
                }
                try:
                    while pending:
                        done_set, _ = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in done_set:
                            cell = pending.pop(fut)
                            finished(cell, fut.result())
                            for c in waiting.pop(cell, []):
                                job = pool.submit(run_cell, str(root), pdict, dataclasses.asdict(c))
                                pending[job] = c
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    finally:
        bar.close()

    ordered = [results[c.key] for c in cells if c.key in results]
    result.files = write_outputs(root, ordered, preset)
    result.rows = result_rows(ordered)
    result.seconds = time.perf_counter() - t_start
    timing_path = root / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"runs": []}
    timing["runs"].append(
        {
            "seconds": round(result.seconds, 1),
            "ran": len(result.ran),
            "skipped": len(result.skipped),
        }
    )
    _write_json(timing_path, timing)
    return result


def write_outputs(
    root: Path, results: Sequence[Mapping[str, Any]], preset: Preset
) -> dict[str, Path]:
    """Write the CSVs, ``tables.md`` and the figures from cell results."""
    files: dict[str, Path] = {}
    rows = result_rows(results)
    if not rows:
        return files
    files["results.csv"] = write_csv(rows, root / "results.csv")
    gs = global_stats_rows(results)
    if gs:
        files["global_stats.csv"] = write_csv(gs, root / "global_stats.csv")
    sweep = sweep_rows(results)
    if sweep:
        files["sweep.csv"] = write_csv(sweep, root / "sweep.csv")
        files["sweep.png"] = plot_sweep(
            sweep, root / "sweep.png", training_window=preset.unet.patch[-1], gs_rows=gs
        )
    text = tables_markdown(read_csv(files["results.csv"]), gs, preset.datasets)
    tables = root / "tables.md"
    tables.write_text(f"Preset `{preset.name}` (fingerprint {preset.fingerprint()})\n\n{text}")
    files["tables.md"] = tables
    for d in preset.datasets:
        arrays = {}
        for res in results:
            c = res["cell"]
            path = root / "cells" / Cell(**c).key / "stitched.npz"
            if c["arch"] == "unet" and c["dataset"] == d and path.exists():
                with np.load(path) as z:
                    arrays[(c["norm"], c["input_norm"])] = {k: z[k] for k in z.files}
        if arrays:
            files[f"stitched-{d}.png"] = plot_stitched(arrays, d, root / f"stitched-{d}.png")
    return files

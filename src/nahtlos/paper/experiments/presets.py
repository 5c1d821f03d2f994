"""What a run of the grid is: the tables' columns, the presets, the cells.

Everything that defines the experiments lives here, in one place: the columns of the
paper's Table 1 (U-Net) and Table 2 (UNETR), the training recipe of each architecture
in the ``quick`` and ``paper`` presets, and the grid of cells (architecture x dataset
x norm) a run trains and evaluates. A preset's fingerprint, stored with every result,
changes with anything that changes results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import NahtlosError

__all__ = [
    "FEATURE_NORM",
    "INPUT_LABEL",
    "NORM_LABEL",
    "PAPER",
    "PRESETS",
    "QUICK",
    "REPORTED_CLASSES",
    "TABLE1_NORMS",
    "TABLE2_NORMS",
    "TRANSFER_DATASETS",
    "ArchPreset",
    "Cell",
    "ExperimentError",
    "Preset",
    "grid",
    "shared_training",
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

NORM_LABEL = {
    "batch": "BatchNorm",
    "instance": "InstanceNorm",
    "batchrenorm": "BatchRenorm",
    "identity": "Identity",
}
"""How the tables and figures name each feature norm."""

FEATURE_NORM = {
    "batch": "global",
    "instance": "tile-wise",
    "batchrenorm": "global",
    "identity": "global",
}
"""Whether a feature norm uses global or tile-wise statistics at inference."""

INPUT_LABEL = {"global": "global", "tilewise": "tile-wise"}
"""How the tables and figures name each input normalization."""

REPORTED_CLASSES = {
    "organoids": ("foreground", "boundaries", "matrix"),
    "plants": ("foreground", "boundaries"),
    "embryo": ("foreground", "boundaries"),
}
"""The classes the paper reports per dataset, in its row order."""


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
    loss, lr_schedule, recalibrate, recalibrate_method, foreground_bias
        ``train.loss``, ``train.lr_schedule``, ``train.recalibrate``,
        ``train.recalibrate_method`` and ``data.foreground_bias`` of the training
        configuration; the defaults are the
        paper's recipe (Dice loss, constant learning rate, no recalibration, uniform
        patches).
    """

    patch: tuple[int, ...]
    model: Mapping[str, Any]
    steps: int
    batch_size: int
    accumulate: int
    lr: float
    warmup_steps: int
    ramp_steps: int
    loss: str = "dice"
    lr_schedule: str = "constant"
    recalibrate: int | str = 0
    recalibrate_method: str = "pooled"
    foreground_bias: float = 0.0

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
    seed, train_seed
        Seed of the data (images ``seed + i``) and of training (every cell draws the
        same patches; default ``seed``). Runs that differ only in ``train_seed`` train
        the same grid on the same data from other initializations and patch orders.
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
    train_seed: int | None = None

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


def _recipe(
    patch: tuple[int, ...],
    model: Mapping[str, Any],
    steps: int,
    accumulate: int,
    *,
    defaults: bool = False,
) -> ArchPreset:
    """The paper's training recipe for ``steps`` optimizer steps, or with ``defaults``
    the recipe of ``nahtlos train`` (loss, learning-rate schedule, recalibration and
    patch sampling of :mod:`nahtlos.training.config`'s defaults).

    Batch size 1 and Adam at 1e-3; BatchRenorm trains as BatchNorm for the first 40% of
    the steps, ramps r_max/d_max over the next 30% and trains the last 30% at full
    bounds. The paper stresses that training must converge before the switch and that
    it be gradual.
    """
    recipe: dict[str, Any] = {}
    if defaults:
        from ...training.config import DataConfig, TrainConfig, default_loss

        train = TrainConfig()
        recipe = {
            "loss": default_loss("sigmoid"),
            "lr_schedule": train.lr_schedule,
            "recalibrate": train.recalibrate,
            "recalibrate_method": train.recalibrate_method,
            "foreground_bias": DataConfig.model_fields["foreground_bias"].default,
        }
    return ArchPreset(
        patch=patch,
        model=model,
        steps=steps,
        batch_size=1,
        accumulate=accumulate,
        lr=1e-3,
        warmup_steps=steps * 2 // 5,
        ramp_steps=steps * 3 // 10,
        **recipe,
    )


# Why the quick preset looks like this (2 CPU cores, under 40 minutes for 30 trainings):
# * batch size 1, as in the paper: BatchNorm's statistics of a single patch are what make
#   its running averages unrepresentative (the source of train/eval disparity); the
#   gradient is accumulated over 4 patches instead of the paper's 8 to halve the cost.
# * BatchRenorm: the warm-up of 40% of the steps is 1920 patches: the running
#   statistics, momentum 0.01, keep e^-19 of their initial values, and the loss has
#   levelled off.
# * small widths (U-Net 16-32-64, the paper's depth; UNETR hidden size 96 instead of 768).
# * the rest of the recipe is `nahtlos train`'s defaults (loss, schedule, sampling,
#   recalibration); the longer BatchRenorm warm-up stays, as in the paper.
QUICK = Preset(
    name="quick",
    ndim=2,
    datasets=("organoids", "plants", "embryo"),
    train_shape=(512, 512),
    n_train=2,
    val_shape=(384, 384),
    n_val=2,
    unet=_recipe((96, 96), {"channels": [16, 32, 64], "strides": [2, 2]}, 1200, 4, defaults=True),
    unetr=_recipe(
        (64, 64),
        {"feature_size": 8, "hidden_size": 96, "mlp_dim": 192, "num_heads": 4},
        600,
        4,
        defaults=True,
    ),
    mismatch_stride=64,
    sweep_windows=(48, 64, 96, 128, 192, 288),
    checkpoint_every=200,
    val_every=300,
    workers=2,
    threads=1,
    device="cpu",
)

# The paper's 3D sizes: patches of 96³, 25 000 optimizer steps of 8 accumulated patches.
PAPER = Preset(
    name="paper",
    ndim=3,
    datasets=("organoids", "plants", "embryo"),
    train_shape=(160, 320, 320),
    n_train=4,
    val_shape=(160, 320, 320),
    n_val=2,
    unet=_recipe((96, 96, 96), {"channels": [32, 64, 128], "strides": [2, 2]}, 25000, 8),
    unetr=_recipe(
        (96, 96, 96),
        {"feature_size": 16, "hidden_size": 768, "mlp_dim": 3072, "num_heads": 12},
        25000,
        8,
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
        return f"{NORM_LABEL[self.norm]} ({INPUT_LABEL[self.input_norm]} input)"


def grid(
    preset: Preset,
    archs: Sequence[str] = ("unet", "unetr"),
    datasets: Sequence[str] | None = None,
) -> list[Cell]:
    """The cells of Table 1 (``unet``) and Table 2 (``unetr``) for the chosen datasets."""
    from ..synth import SYNTHETIC_DATASETS

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

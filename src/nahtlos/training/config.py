"""Training configuration: a YAML file validated by pydantic, with ``key=value`` overrides.

A configuration has four sections; every field has a default except the data::

    data:
      train:                      # one or several image/label volumes
        - {image: train.tif, labels: train_labels.tif}
      val: []                     # validation volumes, or:
      split: {volume: 0, fraction: 0.3, axis: y}   # the last 30% of volume 0 along y
      labels: instances           # or semantic (then num_classes)
      patch: [256, 256]           # training patch (Y, X) or (Z, Y, X)
      input_norm: {mode: global, low: 1.0, high: 99.8}
    model: {arch: unet, ndim: 2, norm: batchrenorm}
    train: {steps: 25000, batch_size: 1, accumulate: 8, lr: 0.001}
    out: runs/my-model

Paths are relative to the configuration file. Errors name the offending field, e.g.
``data.patch [102, 128]: 102 is not a multiple of the network's alignment 4``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ..errors import NahtlosError
from ..io import InputNormalization
from ..nets.models import ConfigSection, ModelConfig
from ..nets.norms import NORM_NAMES
from .losses import LOSS_ACTIVATION, LOSSES, default_loss
from .recalibrate import DEFAULT_RECALIBRATION, RECALIBRATION_METHODS
from .schedules import DEFAULT_LR_SCHEDULE, LR_SCHEDULES

__all__ = [
    "ConfigError",
    "DataConfig",
    "InputNormConfig",
    "LossWeights",
    "RenormConfig",
    "SplitConfig",
    "TrainConfig",
    "TrainingConfig",
    "VolumeConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "upgrade_config",
    "validate_config",
]

NORMS = NORM_NAMES
# What replaces the norms' running averages after training (train.recalibrate and
# train.recalibrate_method); docs/training.md has the measurements that chose them:
# BatchNorm networks gain from population statistics, BatchRenorm networks lose.
DEFAULT_RECALIBRATE: int | Literal["all", "auto"] = "auto"
# nnU-Net's share of foreground-oversampled patches; best on the sparse embryo data of the
# sweep in docs/training.md.
DEFAULT_FOREGROUND_BIAS = 0.33
AXIS_NAMES = {2: "yx", 3: "zyx"}


class ConfigError(NahtlosError, ValueError):
    """A training configuration (file, field or override) that is not valid."""


class VolumeConfig(ConfigSection):
    """One image/label pair. ``file.h5:dataset`` and ``image.zarr:key`` name a dataset."""

    image: str
    labels: str


class SplitConfig(ConfigSection):
    """Validation taken from the end of one training volume along one spatial axis."""

    volume: int = Field(default=0, ge=0, description="index into data.train")
    fraction: float = Field(
        default=0.3, gt=0.0, lt=1.0, description="share that goes to validation"
    )
    axis: int | Literal["z", "y", "x"] = Field(
        default=0, description="spatial axis: an index (0 = first spatial axis) or z/y/x"
    )


class InputNormConfig(ConfigSection):
    """Percentile scaling of the input (see :class:`nahtlos.io.intensity.InputNormalization`)."""

    mode: Literal["global", "tilewise", "none"] = "global"
    low: float = Field(default=1.0, ge=0.0, le=100.0)
    high: float = Field(default=99.8, ge=0.0, le=100.0)
    clip: bool = True

    @model_validator(mode="after")
    def _ordered(self) -> InputNormConfig:
        if self.low >= self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        return self

    def build(self) -> InputNormalization:
        """The (unfitted) :class:`~nahtlos.io.intensity.InputNormalization` it describes."""
        return InputNormalization(mode=self.mode, low=self.low, high=self.high, clip=self.clip)


class DataConfig(ConfigSection):
    """Where the images and labels are and how patches are drawn from them."""

    train: list[VolumeConfig] = Field(min_length=1)
    val: list[VolumeConfig] = Field(default_factory=list)
    split: SplitConfig | None = None
    labels: Literal["instances", "semantic"] = "instances"
    num_classes: int | None = Field(
        default=None, ge=1, description="semantic labels: values 0..n-1"
    )
    boundary_mode: Literal["thick", "inner", "outer"] = "thick"
    patch: list[int] | None = Field(default=None, description="default 96³ in 3D, 256² in 2D")
    foreground_bias: float = Field(
        default=DEFAULT_FOREGROUND_BIAS,
        ge=0.0,
        le=1.0,
        description="probability of insisting on a patch that contains objects",
    )
    flips: bool = True
    input_norm: InputNormConfig = Field(default_factory=lambda: InputNormConfig())

    @field_validator("patch")
    @classmethod
    def _positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(p < 1 for p in v)):
            raise ValueError(f"{v} must be positive sizes per spatial axis")
        return v

    @model_validator(mode="after")
    def _classes(self) -> DataConfig:
        if self.labels == "semantic" and self.num_classes is None:
            raise ValueError("labels: semantic needs num_classes (label values 0..num_classes-1)")
        if self.split is not None and self.split.volume >= len(self.train):
            raise ValueError(
                f"split.volume={self.split.volume} but data.train has {len(self.train)} volumes"
            )
        return self


class RenormConfig(ConfigSection):
    """BatchRenorm's r_max/d_max schedule, counted in optimizer steps.

    Plain BatchNorm (r_max = 1, d_max = 0) for ``warmup_steps``, then linear ramps to
    ``r_max``, ``d_max`` over ``ramp_steps``. Left out, each is 20% of ``train.steps``.
    """

    warmup_steps: int | None = Field(default=None, ge=0)
    ramp_steps: int | None = Field(default=None, ge=0)
    r_max: float = Field(default=3.0, ge=1.0)
    d_max: float = Field(default=5.0, ge=0.0)


class LossWeights(ConfigSection):
    """Weights of the two terms of a compound loss (nnU-Net's: 1 and 1)."""

    dice: float = Field(default=1.0, ge=0.0)
    ce: float = Field(default=1.0, ge=0.0)


class TrainConfig(ConfigSection):
    """The optimization: Adam, batch size x gradient accumulation, loss, schedules."""

    steps: int = Field(default=25000, ge=1, description="optimizer steps")
    batch_size: int = Field(default=1, ge=1)
    accumulate: int = Field(default=8, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(default=1e-3, gt=0.0)
    lr_schedule: str = Field(
        default=DEFAULT_LR_SCHEDULE, description=f"one of {', '.join(LR_SCHEDULES)}"
    )
    lr_warmup: int = Field(default=0, ge=0, description="steps of linear learning-rate warm-up")
    loss: str | None = Field(
        default=None,
        description=f"one of {', '.join(LOSSES)}; default: the compound loss of the activation",
    )
    loss_weights: LossWeights = Field(default_factory=lambda: LossWeights())
    seed: int = 0
    renorm: RenormConfig = Field(default_factory=lambda: RenormConfig())
    recalibrate: int | Literal["all", "auto"] = Field(
        default=DEFAULT_RECALIBRATE,
        description="the norms' population statistics at the end: over this many random "
        "training patches, over 'all' (tiles covering the training regions), 'auto' ('all' "
        "for BatchNorm networks, off for BatchRenorm ones), or 0: off",
    )
    recalibrate_method: str = Field(
        default=DEFAULT_RECALIBRATION, description=f"one of {', '.join(RECALIBRATION_METHODS)}"
    )
    init: str | None = Field(
        default=None, description="start from this checkpoint's weights (fresh optimizer)"
    )
    val_every: int = Field(default=500, ge=1)
    val_block: list[int] | None = Field(default=None, description="inner block of validation")
    val_batch_size: int = Field(default=4, ge=1)
    checkpoint_every: int = Field(default=1000, ge=1)
    device: str = "auto"

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str | None) -> str | None:
        if v is not None and v not in LOSSES:
            raise ValueError(f"{v!r} is not a loss; choose one of {', '.join(LOSSES)}")
        return v

    @field_validator("recalibrate", mode="before")
    @classmethod
    def _patches(cls, v: Any) -> Any:
        # before pydantic's coercion: `true` must not become 1 patch, and one message
        # names the value and the choices
        if v in ("all", "auto") or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(
            f"{v!r}: give 'auto' (BatchNorm networks), 'all' (tiles covering the training "
            "regions), a number of random patches, or 0 (off)"
        )

    @field_validator("recalibrate_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in RECALIBRATION_METHODS:
            raise ValueError(
                f"{v!r} is not a recalibration method; choose one of {', '.join(RECALIBRATION_METHODS)}"
            )
        return v

    @field_validator("lr_schedule")
    @classmethod
    def _known_schedule(cls, v: str) -> str:
        if v not in LR_SCHEDULES:
            raise ValueError(
                f"{v!r} is not a learning-rate schedule; choose one of {', '.join(LR_SCHEDULES)}"
            )
        return v

    def warmup_and_ramp(self) -> tuple[int, int]:
        """The schedule lengths, with the defaults (20% of the steps each) filled in."""
        default = max(1, self.steps // 5)
        warm = self.renorm.warmup_steps
        ramp = self.renorm.ramp_steps
        return (default if warm is None else warm, default if ramp is None else ramp)


class TrainingConfig(ConfigSection):
    """Everything a training run needs; saved inside every checkpoint."""

    data: DataConfig
    model: ModelConfig = Field(default_factory=lambda: ModelConfig())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    out: str = "nahtlos-run"

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        nd = self.model.ndim
        align = self.model.alignment
        if self.data.patch is None:
            self.data.patch = [96] * 3 if nd == 3 else [256] * 2
        if len(self.data.patch) != nd:
            raise ValueError(
                f"data.patch {self.data.patch} has {len(self.data.patch)} axes but model.ndim is {nd}"
            )
        bad = [p for p in self.data.patch if p % align]
        if bad:
            raise ValueError(
                f"data.patch {self.data.patch}: {bad[0]} is not a multiple of the network's "
                f"alignment {align} (its total down-sampling); use e.g. "
                f"{[-(-p // align) * align for p in self.data.patch]}"
            )
        if self.model.arch == "unetr" and any(p < 48 for p in self.data.patch):
            raise ValueError(
                f"data.patch {self.data.patch}: UNETR needs at least 48 per axis "
                "(its window is fixed to the patch; a halo of at least 16 is cropped from each side)"
            )
        if self.train.loss is None:
            self.train.loss = default_loss(self.model.activation)
        needs = LOSS_ACTIVATION[self.train.loss]
        if needs is not None and needs != self.model.activation:
            raise ValueError(
                f"train.loss {self.train.loss!r} needs model.activation {needs!r}, not "
                f"{self.model.activation!r}; use train.loss={default_loss(self.model.activation)!r}"
            )
        vb = self.train.val_block
        if vb is not None and self.model.arch == "unetr":
            raise ValueError(
                "train.val_block: a UNETR's window is fixed to data.patch; leave val_block out"
            )
        if vb is not None:
            if len(vb) != nd:
                raise ValueError(f"train.val_block {vb} has {len(vb)} axes but model.ndim is {nd}")
            if any(v < 1 or v % align for v in vb):
                raise ValueError(
                    f"train.val_block {vb} must be positive multiples of the alignment {align}"
                )
        if isinstance(self.data.split, SplitConfig):
            axis = self.data.split.axis
            if isinstance(axis, str) and axis not in AXIS_NAMES[nd]:
                raise ValueError(f"data.split.axis {axis!r} is not a {nd}D axis ({AXIS_NAMES[nd]})")
            if isinstance(axis, int) and not -nd <= axis < nd:
                raise ValueError(f"data.split.axis {axis} is out of range for {nd} spatial axes")
        return self

    @property
    def out_channels(self) -> int:
        """Classes predicted: 3 (boundaries, foreground, background) for instance labels."""
        if self.data.labels == "instances":
            return 3
        assert self.data.num_classes is not None
        return self.data.num_classes

    def split_axis(self) -> int | None:
        """The split axis as an index among the spatial axes (None without a split)."""
        if self.data.split is None:
            return None
        axis = self.data.split.axis
        nd = self.model.ndim
        return AXIS_NAMES[nd].index(axis) if isinstance(axis, str) else axis % nd


def _format_error(exc: ValidationError, source: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (a typo?)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{loc}: {msg}")
    return ConfigError(f"invalid configuration {source}: " + "; ".join(lines))


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise ConfigError(
                    f"override {key!r}: {'.'.join(parts[: i + 1])} is not an index of a list "
                    f"of {len(node)} entries"
                ) from None
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:i])} is not a section")
        node = node.setdefault(part, {})
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = value
        except (ValueError, IndexError):
            raise ConfigError(f"override {key!r}: {last!r} is not an index of the list") from None
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"override {key!r}: {'.'.join(parts[:-1])} is not a section")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config dict.

    ``train.steps=500``, ``data.patch=[128,128]``, ``data.train.0.image=a.tif``.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.steps=500)"
            )
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({exc})") from None
        _set_dotted(data, key.strip(), value)
    return data


def validate_config(data: dict[str, Any], source: str = "") -> TrainingConfig:
    """Validate a raw dict; errors name the offending field."""
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as exc:
        raise _format_error(exc, source or "(dict)") from None


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    section = data.get("data")
    if isinstance(section, dict):
        for group in ("train", "val"):
            for vol in section.get(group) or []:
                if isinstance(vol, dict):
                    for k in ("image", "labels"):
                        if isinstance(vol.get(k), str) and not os.path.isabs(vol[k]):
                            vol[k] = str(base / vol[k])
    train = data.get("train")
    init = train.get("init") if isinstance(train, dict) else None
    if isinstance(train, dict) and isinstance(init, str) and not os.path.isabs(init):
        train["init"] = str(base / init)
    if isinstance(data.get("out"), str) and not os.path.isabs(data["out"]):
        data["out"] = str(base / data["out"])


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> TrainingConfig:
    """Read a YAML configuration (or start from ``base``), apply overrides, validate.

    Relative paths in the file are taken relative to the file's folder.

    Raises
    ------
    ConfigError
        If the file is not YAML, or a field (named in the message) is invalid.
    """
    data: dict[str, Any] = dict(base or {})
    source = "(command line)"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"configuration file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration {str(p)!r} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration {str(p)!r} must be a mapping of sections")
        _resolve_paths(loaded, p.resolve().parent)
        data.update(loaded)
        source = repr(str(p))
    apply_overrides(data, list(overrides))
    return validate_config(data, source)


def dump_config(config: TrainingConfig) -> str:
    """The configuration as YAML (what a run saves beside its checkpoints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# What a configuration written before a field existed meant: resuming such a run must
# continue with the recipe it started with, not with today's defaults.
_BEFORE_FIELDS = {"loss": "dice", "lr_schedule": "constant", "recalibrate": 0}


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A raw configuration from an older checkpoint, with the fields it predates set to
    the behaviour of the version that wrote it (the paper's Dice loss, a constant
    learning rate, no recalibration)."""
    data = dict(data)
    train = dict(data.get("train") or {})
    for key, value in _BEFORE_FIELDS.items():
        train.setdefault(key, value)
    data["train"] = train
    return data

"""Networks by name: MONAI ``UNet`` and ``UNETR`` with the feature norm chosen by name.

``build_model("unet", ndim=3, in_channels=1, out_channels=3, norm="batchrenorm")`` gives
the paper's U-Net (two down-sampling steps, 32-64-128 features); ``"unetr"`` its UNETR
(patch 16, hidden size 768, 12 heads, convolutional patch projection, learnable
positional embedding, dropout 0), with the decoder's norms replaced.

Every running average (BatchNorm, InstanceNorm with running statistics, BatchRenorm)
uses momentum 0.01, as in the paper.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .norms import NORM_NAMES, monai_norm

__all__ = [
    "ARCHS",
    "ConfigSection",
    "ModelConfig",
    "build_model",
    "model_alignment",
    "model_from_config",
    "norm_options",
    "unetr_halo",
]

ARCHS = ("unet", "unetr")
# MONAI's UNETR splits its input into patches of this size (not configurable in MONAI).
UNETR_PATCH = 16


class ConfigSection(BaseModel):
    # Unknown keys are typos: reject them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(ConfigSection):
    """The network: a MONAI ``UNet`` or ``UNETR`` with the feature norm chosen by name."""

    arch: Literal["unet", "unetr"] = "unet"
    ndim: Literal[2, 3] = 3
    norm: str = "batchrenorm"
    in_channels: int = Field(default=1, ge=1)
    activation: Literal["sigmoid", "softmax"] = "sigmoid"
    momentum: float = Field(default=0.01, gt=0.0, le=1.0, description="of every running average")
    groups: int | None = Field(
        default=None, ge=1, description="groups of the group norm (default: per layer, ≤ 8)"
    )
    # unet
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128])
    strides: list[int] = Field(default_factory=lambda: [2, 2])
    kernel_size: int = Field(default=3, ge=1)
    num_res_units: int = Field(default=0, ge=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # unetr (the patch size of MONAI's UNETR is fixed at 16)
    feature_size: int = Field(default=16, ge=1)
    hidden_size: int = Field(default=768, ge=1)
    mlp_dim: int = Field(default=3072, ge=1)
    num_heads: int = Field(default=12, ge=1)

    @field_validator("norm")
    @classmethod
    def _norm(cls, v: str) -> str:
        if v not in NORM_NAMES:
            raise ValueError(f"{v!r} is not one of {', '.join(NORM_NAMES)}")
        return v

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError(f"{v} must be odd (same-size padding needs an odd kernel)")
        return v

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.arch == "unet":
            if len(self.channels) < 2:
                raise ValueError(f"channels {self.channels}: a U-Net needs at least two levels")
            if len(self.strides) != len(self.channels) - 1:
                raise ValueError(
                    f"strides {self.strides} must have one entry per down-sampling step, "
                    f"len(channels) - 1 = {len(self.channels) - 1}"
                )
            if any(s < 1 for s in self.strides):
                raise ValueError(f"strides {self.strides} must be positive")
            if (
                self.norm == "group"
                and self.groups is not None
                and any(c % self.groups for c in self.channels)
            ):
                raise ValueError(
                    f"groups={self.groups} must divide every entry of channels {self.channels}"
                )
        else:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}"
                )
            if self.norm == "group" and self.groups is not None and self.feature_size % self.groups:
                raise ValueError(
                    f"groups={self.groups} must divide feature_size={self.feature_size}"
                )
        return self

    @property
    def alignment(self) -> int:
        """The total down-sampling factor: patch and block origins are multiples of it."""
        return model_alignment(self.arch, self.strides)


def norm_options(norm: str, momentum: float, groups: int | None) -> dict[str, Any]:
    """The options of a norm layer that a model configuration sets: the momentum of
    norms with running statistics, the number of groups of GroupNorm."""
    kwargs: dict[str, Any] = {}
    if norm in ("batch", "instance_running", "batchrenorm"):
        kwargs["momentum"] = momentum
    if norm == "group" and groups is not None:
        kwargs["num_groups"] = groups
    return kwargs


def _norm_argument(norm: str, momentum: float, groups: int | None) -> Any:
    """MONAI's ``norm=`` argument for a norm name, with the paper's momentum."""
    return monai_norm(norm, **norm_options(norm, momentum, groups))


def build_model(
    arch: str,
    ndim: int,
    in_channels: int,
    out_channels: int,
    norm: str = "batchrenorm",
    *,
    momentum: float = 0.01,
    groups: int | None = None,
    channels: Sequence[int] = (32, 64, 128),
    strides: Sequence[int] = (2, 2),
    kernel_size: int = 3,
    num_res_units: int = 0,
    dropout: float = 0.0,
    img_size: Sequence[int] | None = None,
    feature_size: int = 16,
    hidden_size: int = 768,
    mlp_dim: int = 3072,
    num_heads: int = 12,
) -> torch.nn.Module:
    """Build a network by name, in training mode.

    Parameters
    ----------
    arch
        ``"unet"`` (MONAI ``UNet``) or ``"unetr"`` (MONAI ``UNETR``).
    ndim
        2 or 3 spatial dimensions.
    in_channels, out_channels
        Input channels and predicted classes.
    norm
        Feature norm by name: ``batch``, ``instance``, ``instance_running``,
        ``batchrenorm``, ``group`` or ``identity``.
    momentum
        Momentum of every running average (0.01 in the paper).
    groups
        Number of groups for ``group`` (it must divide every layer's channels); by
        default the largest divisor of each layer's channels up to 8.
    channels, strides, kernel_size, num_res_units, dropout
        U-Net widths per level, down-sampling per step, kernel, residual units, dropout.
    img_size
        UNETR only: its fixed input window (a multiple of 16 per axis).
    feature_size, hidden_size, mlp_dim, num_heads
        UNETR sizes (the paper's are 16, 768, 3072, 12).

    Raises
    ------
    ValueError
        For an unknown architecture or norm, or sizes the network cannot take.
    """
    norm_arg = _norm_argument(norm, momentum, groups)
    if ndim not in (2, 3):
        raise ValueError(f"ndim must be 2 or 3, got {ndim}")
    if arch == "unet":
        from monai.networks.nets import UNet

        if len(strides) != len(channels) - 1:
            raise ValueError(
                f"strides {tuple(strides)} need one entry per down-sampling step "
                f"(len(channels) - 1 = {len(channels) - 1})"
            )
        return UNet(
            ndim,
            in_channels,
            out_channels,
            channels=tuple(channels),
            strides=tuple(strides),
            kernel_size=kernel_size,
            up_kernel_size=kernel_size,
            num_res_units=num_res_units,
            norm=norm_arg,
            dropout=dropout,
        )
    if arch == "unetr":
        from monai.networks.nets import UNETR

        if img_size is None:
            raise ValueError("a UNETR needs img_size, its fixed input window")
        size = tuple(int(s) for s in img_size)
        if len(size) != ndim or any(s % UNETR_PATCH for s in size):
            raise ValueError(
                f"UNETR img_size {size} must have {ndim} entries, each a multiple of {UNETR_PATCH}"
            )
        return UNETR(
            in_channels,
            out_channels,
            img_size=size,
            feature_size=feature_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            proj_type="conv",
            norm_name=norm_arg,
            dropout_rate=0.0,
            spatial_dims=ndim,
        )
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def model_from_config(
    cfg: ModelConfig, out_channels: int, patch: Sequence[int] | None = None
) -> torch.nn.Module:
    """:func:`build_model` from a :class:`~nahtlos.training.config.ModelConfig`.

    ``patch`` is the UNETR's fixed window (the training patch).
    """
    return build_model(
        cfg.arch,
        cfg.ndim,
        cfg.in_channels,
        out_channels,
        cfg.norm,
        momentum=cfg.momentum,
        groups=cfg.groups,
        channels=cfg.channels,
        strides=cfg.strides,
        kernel_size=cfg.kernel_size,
        num_res_units=cfg.num_res_units,
        dropout=cfg.dropout,
        img_size=patch,
        feature_size=cfg.feature_size,
        hidden_size=cfg.hidden_size,
        mlp_dim=cfg.mlp_dim,
        num_heads=cfg.num_heads,
    )


def model_alignment(arch: str, strides: Sequence[int] = (2, 2)) -> int:
    """Total down-sampling factor: block origins and halos must be multiples of it."""
    return math.prod(strides) if arch == "unet" else UNETR_PATCH


def unetr_halo(img_size: Sequence[int]) -> tuple[int, ...]:
    """A halo for a UNETR, whose global attention makes every output depend on the window.

    No halo makes its stitching exact; this crops a quarter of the window on each side
    (in steps of its patch size 16, at least 16) and keeps the centre half, where the
    context is most symmetric.
    """
    return tuple(max(UNETR_PATCH, (int(s) // 4) // UNETR_PATCH * UNETR_PATCH) for s in img_size)

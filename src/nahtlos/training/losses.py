"""Training losses by name: the paper's Dice loss and the compound Dice + cross-entropy.

=============  ============================================================================
``dice``       the paper's (Appendix A): soft Dice averaged over the (sample, channel)
               pairs whose label is not empty. Works with ``sigmoid`` and ``softmax``.
``dice_bce``   ``dice`` + binary cross-entropy with logits, per channel (``sigmoid``):
               plantseg / pytorch-3dunet's compound loss.
``dice_ce``    ``dice`` + cross-entropy over the channels (``softmax``): nnU-Net's loss.
=============  ============================================================================

The empty-channel rule applies to the Dice term only: Dice is undefined where the label
is empty, while cross-entropy is defined everywhere and is what teaches the network to
predict nothing where there is nothing. The cross-entropy term is the mean over every
voxel (and, for ``dice_bce``, every channel), as in ``torch.nn.functional``.

Why a compound loss: with a sigmoid output and batch size 1, the soft Dice alone sits
on a plateau for thin classes (boundaries) for hundreds of steps; the cross-entropy
gradient does not vanish on them (docs/training.md has the measurements).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import ShapeMismatchError

__all__ = [
    "LOSSES",
    "LOSS_ACTIVATION",
    "default_loss",
    "dice_bce_loss",
    "dice_ce_loss",
    "dice_loss",
    "loss_function",
]

LOSSES: tuple[str, ...] = ("dice", "dice_bce", "dice_ce")
"""The loss names of ``train.loss``."""

LOSS_ACTIVATION: dict[str, str | None] = {"dice": None, "dice_bce": "sigmoid", "dice_ce": "softmax"}
"""The output activation each loss needs (``None``: either)."""


def default_loss(activation: str) -> str:
    """The compound loss that matches an output activation (the user default)."""
    return "dice_ce" if activation == "softmax" else "dice_bce"


def _check_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ShapeMismatchError(
            f"network output {tuple(logits.shape)} and target {tuple(target.shape)} differ"
        )


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, activation: str = "sigmoid"
) -> torch.Tensor:
    """Dice loss averaged over the (sample, channel) pairs whose label is not empty.

    The paper averages the Dice loss over channels but leaves out channels that are
    empty in the label patch, where Dice is undefined. Per pair this is MONAI's
    ``DiceLoss`` (``1 - (2 Σ p·g + ε) / (Σ p + Σ g + ε)``, ε = 1e-5). If every
    channel is empty the loss is 0 (with a gradient of 0, so that the graph stays).

    Parameters
    ----------
    logits
        ``(N, C, *spatial)`` network output.
    target
        ``(N, C, *spatial)`` one-hot (or soft) target.
    activation
        ``sigmoid`` (per channel) or ``softmax`` (over channels).
    """
    from monai.losses import DiceLoss

    _check_shapes(logits, target)
    loss_fn = DiceLoss(
        sigmoid=activation == "sigmoid", softmax=activation == "softmax", reduction="none"
    )
    per_pair = loss_fn(logits, target).reshape(logits.shape[0], logits.shape[1])
    present = target.reshape(target.shape[0], target.shape[1], -1).sum(-1) > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    return per_pair[present].mean()


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    """``dice_weight`` · :func:`dice_loss` (sigmoid) + ``ce_weight`` · mean BCE with logits."""
    _check_shapes(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return dice_weight * dice_loss(logits, target, "sigmoid") + ce_weight * bce


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dice_weight: float = 1.0,
    ce_weight: float = 1.0,
) -> torch.Tensor:
    """``dice_weight`` · :func:`dice_loss` (softmax) + ``ce_weight`` · mean cross-entropy.

    ``target`` holds class probabilities per voxel (one-hot from the labels); the
    cross-entropy is ``-Σ_c t_c log softmax(logits)_c`` averaged over voxels.
    """
    _check_shapes(logits, target)
    ce = F.cross_entropy(logits, target)
    return dice_weight * dice_loss(logits, target, "softmax") + ce_weight * ce


def loss_function(
    name: str, activation: str, dice_weight: float = 1.0, ce_weight: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss ``name`` as ``f(logits, target)``.

    Raises
    ------
    ValueError
        For an unknown name, or a loss whose activation is not the model's.
    """
    if name not in LOSSES:
        raise ValueError(f"loss {name!r} is not one of {', '.join(LOSSES)}")
    needs = LOSS_ACTIVATION[name]
    if needs is not None and needs != activation:
        raise ValueError(
            f"loss {name!r} needs a {needs} output but the model's activation is {activation!r}; "
            f"use {default_loss(activation)!r}"
        )
    if name == "dice":
        return lambda logits, target: dice_loss(logits, target, activation)
    compound = dice_bce_loss if name == "dice_bce" else dice_ce_loss
    return lambda logits, target: compound(
        logits, target, dice_weight=dice_weight, ce_weight=ce_weight
    )

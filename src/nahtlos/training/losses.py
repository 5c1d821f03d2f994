"""Training losses."""

from __future__ import annotations

import torch

from ..errors import ShapeMismatchError

__all__ = ["dice_loss"]


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

    if logits.shape != target.shape:
        raise ShapeMismatchError(
            f"network output {tuple(logits.shape)} and target {tuple(target.shape)} differ"
        )
    loss_fn = DiceLoss(
        sigmoid=activation == "sigmoid", softmax=activation == "softmax", reduction="none"
    )
    per_pair = loss_fn(logits, target).reshape(logits.shape[0], logits.shape[1])
    present = target.reshape(target.shape[0], target.shape[1], -1).sum(-1) > 0
    if not bool(present.any()):
        return logits.sum() * 0.0
    return per_pair[present].mean()

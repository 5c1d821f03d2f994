"""Losses against hand computations on tiny tensors, the empty-channel rule included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nahtlos.training.losses import (
    LOSSES,
    default_loss,
    dice_bce_loss,
    dice_ce_loss,
    dice_loss,
    loss_function,
)


def _reference_dice_loss(logits, target, eps=1e-5, softmax=False):
    x = logits.astype(np.float64)
    if softmax:
        e = np.exp(x - x.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
    else:
        p = 1 / (1 + np.exp(-x))
    losses = []
    for n in range(p.shape[0]):
        for c in range(p.shape[1]):
            g = target[n, c]
            if g.sum() == 0:
                continue  # the paper skips channels empty in the label patch
            losses.append(1 - (2 * (p[n, c] * g).sum() + eps) / (p[n, c].sum() + g.sum() + eps))
    return np.mean(losses) if losses else 0.0


def _reference_bce(logits, target):
    x = logits.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    return float(np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p))))


def _reference_ce(logits, target):
    x = logits.astype(np.float64)
    log_p = x - x.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    return float(np.mean(-(target * log_p).sum(1)))


@pytest.fixture
def pair(rng):
    logits = rng.normal(0, 2, (2, 3, 5, 4)).astype(np.float32)
    target = np.zeros((2, 3, 5, 4), np.float32)
    target[0, 0, :2] = 1
    target[0, 2, 2:] = 1  # sample 0: channel 1 empty
    target[1, 1] = 1  # sample 1: only channel 1 present
    return logits, target


def test_dice_loss_skips_empty_channels(pair):
    logits, target = pair
    got = dice_loss(torch.from_numpy(logits), torch.from_numpy(target))
    assert got.item() == pytest.approx(_reference_dice_loss(logits, target), rel=1e-5)
    # an empty channel changes nothing, whatever the prediction there
    logits2 = logits.copy()
    logits2[0, 1] = 30.0
    again = dice_loss(torch.from_numpy(logits2), torch.from_numpy(target))
    assert again.item() == pytest.approx(got.item(), rel=1e-6)


def test_dice_loss_softmax_and_all_empty():
    logits = torch.randn(1, 3, 6, 6, requires_grad=True)
    target = torch.zeros(1, 3, 6, 6)
    loss = dice_loss(logits, target)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None and not logits.grad.any()
    target[0, 0] = 1
    p = torch.softmax(logits.detach(), 1)[0, 0]
    want = 1 - (2 * p.sum() + 1e-5) / (p.sum() + 36 + 1e-5)
    assert dice_loss(logits, target, "softmax").item() == pytest.approx(want.item(), rel=1e-5)


def test_dice_bce_is_dice_over_present_channels_plus_bce_over_all(pair):
    logits, target = pair
    want = _reference_dice_loss(logits, target) + _reference_bce(logits, target)
    got = dice_bce_loss(torch.from_numpy(logits), torch.from_numpy(target))
    assert got.item() == pytest.approx(want, rel=1e-5)
    # the Dice term ignores the empty channel but the BCE term does not: predicting
    # objects where the label is empty costs cross-entropy only
    logits2 = logits.copy()
    logits2[0, 1] = 10.0
    got2 = dice_bce_loss(torch.from_numpy(logits2), torch.from_numpy(target)).item()
    want2 = _reference_dice_loss(logits2, target) + _reference_bce(logits2, target)
    assert got2 == pytest.approx(want2, rel=1e-5)
    assert _reference_dice_loss(logits2, target) == pytest.approx(
        _reference_dice_loss(logits, target), rel=1e-9
    )
    assert got2 > got.item()
    # weights
    weighted = dice_bce_loss(
        torch.from_numpy(logits), torch.from_numpy(target), dice_weight=0.5, ce_weight=2.0
    )
    want_w = 0.5 * _reference_dice_loss(logits, target) + 2.0 * _reference_bce(logits, target)
    assert weighted.item() == pytest.approx(want_w, rel=1e-5)


def test_dice_ce_uses_softmax_over_channels(rng):
    logits = rng.normal(0, 2, (2, 3, 4, 4)).astype(np.float32)
    classes = rng.integers(0, 2, (2, 4, 4))  # class 2 never occurs: an empty channel
    target = np.moveaxis(np.eye(3, dtype=np.float32)[classes], -1, 1)
    want = _reference_dice_loss(logits, target, softmax=True) + _reference_ce(logits, target)
    got = dice_ce_loss(torch.from_numpy(logits), torch.from_numpy(target))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_all_empty_target_keeps_a_graph_and_only_the_ce_term():
    logits = torch.zeros(1, 2, 3, 3, requires_grad=True)
    target = torch.zeros(1, 2, 3, 3)
    loss = dice_bce_loss(logits, target)
    assert loss.item() == pytest.approx(np.log(2.0), rel=1e-6)  # BCE of p=0.5 against 0
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad > 0)


def test_loss_by_name_checks_the_activation():
    assert set(LOSSES) == {"dice", "dice_bce", "dice_ce"}
    assert default_loss("sigmoid") == "dice_bce" and default_loss("softmax") == "dice_ce"
    x, y = torch.randn(1, 2, 4, 4), torch.ones(1, 2, 4, 4)
    assert loss_function("dice", "softmax")(x, y).item() == pytest.approx(
        dice_loss(x, y, "softmax").item()
    )
    with pytest.raises(ValueError, match="'dice_ce' needs a softmax output"):
        loss_function("dice_ce", "sigmoid")
    with pytest.raises(ValueError, match="'focal' is not one of dice, dice_bce, dice_ce"):
        loss_function("focal", "sigmoid")

"""Learning-rate schedules at chosen steps."""

from __future__ import annotations

import itertools
import math

import pytest

from nahtlos.training.schedules import LR_SCHEDULES, learning_rate


def test_constant_poly_cosine_at_chosen_steps():
    assert LR_SCHEDULES == ("constant", "poly", "cosine")
    assert [learning_rate(s, 100, 1e-3, "constant") for s in (0, 50, 99)] == [1e-3] * 3
    assert learning_rate(0, 100, 1e-3, "poly") == pytest.approx(1e-3)
    assert learning_rate(50, 100, 1e-3, "poly") == pytest.approx(1e-3 * 0.5**0.9)
    assert learning_rate(99, 100, 1e-3, "poly") == pytest.approx(1e-3 * 0.01**0.9)
    assert learning_rate(0, 100, 1e-3, "cosine") == pytest.approx(1e-3)
    assert learning_rate(50, 100, 1e-3, "cosine") == pytest.approx(5e-4)
    assert learning_rate(25, 100, 1e-3, "cosine") == pytest.approx(
        1e-3 * 0.5 * (1 + math.cos(math.pi / 4))
    )


def test_linear_warmup_then_the_schedule_over_the_rest():
    lrs = [learning_rate(s, 110, 1.0, "poly", warmup=10) for s in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5**0.9)  # halfway through the 100 steps after it
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert learning_rate(5, 10, 1.0, "constant", warmup=20) == pytest.approx(6 / 10)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="'step' is not one of constant, poly, cosine"):
        learning_rate(0, 10, 1.0, "step")

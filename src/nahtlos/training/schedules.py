"""Learning-rate schedules by name, as pure functions of the optimizer step.

=============  ==============================================================
``constant``   the paper's: ``lr`` throughout.
``poly``       nnU-Net's: ``lr · (1 - t)^0.9``, t the fraction of steps done.
``cosine``     ``lr · (1 + cos(π t)) / 2``.
=============  ==============================================================

An optional linear warm-up (``lr_warmup`` steps) rises from ``lr / lr_warmup`` to ``lr``
first; the schedule then runs over the remaining steps. Being a function of the step
alone, the learning rate needs no state of its own: a resumed run continues exactly.
"""

from __future__ import annotations

import math

__all__ = ["DEFAULT_LR_SCHEDULE", "LR_SCHEDULES", "POLY_EXPONENT", "learning_rate"]

LR_SCHEDULES: tuple[str, ...] = ("constant", "poly", "cosine")
"""The names of ``train.lr_schedule``."""

# The user default; docs/training.md has the sweep that chose it.
DEFAULT_LR_SCHEDULE = "constant"

POLY_EXPONENT = 0.9
"""nnU-Net's exponent of the polynomial decay."""


def learning_rate(step: int, steps: int, lr: float, schedule: str, warmup: int = 0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``steps``.

    Raises
    ------
    ValueError
        For an unknown schedule name.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(
            f"learning-rate schedule {schedule!r} is not one of {', '.join(LR_SCHEDULES)}"
        )
    warmup = min(max(int(warmup), 0), steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    t = (step - warmup) / max(steps - warmup, 1)
    t = min(max(t, 0.0), 1.0)
    if schedule == "poly":
        return lr * (1.0 - t) ** POLY_EXPONENT
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))

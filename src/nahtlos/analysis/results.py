"""What a diagnosis found: :class:`DiagnosisReport`, :class:`Verdict`, :class:`SweepPoint`.

The data classes :func:`nahtlos.analysis.diagnose.diagnose` returns, and their JSON
form (``report.json``, valid against :func:`nahtlos.analysis.report.report_schema`).
A figure that could not be measured is ``None`` in Python and ``null`` in JSON, never
a stand-in number: the train/eval disparity of a traced TorchScript model, Dice
without labels, the receptive field when it was not probed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..errors import NahtlosError
from ..nets.receptive_field import ReceptiveField
from .metrics import TileMismatch, TrainEvalDisparity
from .report import render_html, render_markdown, write_report

__all__ = [
    "DISPARITY_THRESHOLD",
    "DiagnosisReport",
    "DisparityLevel",
    "SweepPoint",
    "Verdict",
]

#: Train/eval disparity (1 − Dice, on some channel) from which it is called substantial.
DISPARITY_THRESHOLD = 0.05

DisparityLevel = Literal["none", "small", "substantial", "not measurable"]

SCHEMA_NAME = "nahtlos-diagnosis-report/1"


@dataclass
class Verdict:
    """The conclusion in plain words.

    Attributes
    ----------
    seamless
        Tile mismatch below the tolerance and the tiled prediction equal to the
        whole-image prediction.
    tile_dependent
        Whether predictions depend on the whole tile (from the receptive field, or
        from tile-wise normalization layers when it was not measured); ``None`` if
        unknown.
    disparity
        ``"none"`` (identical masks), ``"small"``, ``"substantial"`` (at least
        :data:`DISPARITY_THRESHOLD` on some channel), or ``"not measurable"`` (a traced
        TorchScript model, whose normalization ignores train/eval mode).
    headline, findings, actions
        One sentence, what was found, and what to do.
    """

    seamless: bool
    tile_dependent: bool | None
    disparity: DisparityLevel
    headline: str
    findings: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "seamless": self.seamless,
            "tile_dependent": self.tile_dependent,
            "disparity": self.disparity,
            "headline": self.headline,
            "findings": list(self.findings),
            "actions": list(self.actions),
        }


@dataclass
class SweepPoint:
    """One inference tile size of the sweep.

    ``agreement`` is, per channel, the Dice of the tiled and the whole-image masks;
    ``dice`` the Dice of the tiled prediction against the labels (``None`` without
    labels, and per channel ``None`` where the labels are empty).
    """

    size: int
    tile: tuple[int, ...]
    window: tuple[int, ...]
    blocks: int
    max_difference: float
    agreement: list[float]
    dice: list[float | None] | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "size": self.size,
            "tile": list(self.tile),
            "window": list(self.window),
            "blocks": self.blocks,
            "max_difference": self.max_difference,
            "agreement": self.agreement,
            "dice": self.dice,
            "seconds": self.seconds,
        }


@dataclass
class DiagnosisReport:
    """Everything :func:`~nahtlos.analysis.diagnose.diagnose` measured, with its figures (PNG bytes).

    ``to_dict()`` gives the content of ``report.json``; :meth:`write` writes the
    JSON, Markdown and HTML reports and the figures to a folder. ``worst_tile`` is
    ``None`` when the train/eval disparity is not measurable, ``dice`` without labels
    and ``global_statistics`` when the model has no tile-wise norm layers to freeze
    (or is TorchScript); in ``dice``, ``train`` is ``None`` on every channel when the
    model's normalization ignores train/eval mode.
    """

    verdict: Verdict
    model: dict[str, Any]
    image: dict[str, Any]
    settings: dict[str, Any]
    tile_mismatch: TileMismatch
    seam: dict[str, Any]
    train_eval_disparity: TrainEvalDisparity
    worst_tile: dict[str, Any] | None
    receptive_field: ReceptiveField | None
    normalization_layers: list[dict[str, Any]]
    dice: dict[str, list[float | None]] | None
    sweep: list[SweepPoint]
    timings: dict[str, float]
    figures: dict[str, bytes] = field(default_factory=dict, repr=False)
    created: str = ""
    global_statistics: dict[str, Any] | None = None

    @property
    def seamless(self) -> bool:
        """Shortcut for ``verdict.seamless``."""
        return self.verdict.seamless

    def to_dict(self) -> dict[str, Any]:
        """The content of ``report.json`` (valid against :func:`nahtlos.analysis.report.report_schema`)."""
        from .._version import __version__

        rf = self.receptive_field
        data: dict[str, Any] = {
            "schema": SCHEMA_NAME,
            "nahtlos_version": __version__,
            "created": self.created,
            "verdict": self.verdict.to_dict(),
            "model": self.model,
            "image": self.image,
            "settings": self.settings,
            "tile_mismatch": _mismatch_dict(self.tile_mismatch),
            "seam": self.seam,
            "train_eval_disparity": {
                **self.train_eval_disparity.to_dict(),
                "measurable": self.train_eval_disparity.measurable,
                "worst_tile": self.worst_tile,
            },
            "receptive_field": None
            if rf is None
            else rf.to_dict(self.settings.get("erf_mass", 0.99)),
            "normalization_layers": self.normalization_layers,
            "tile_size_sweep": [p.to_dict() for p in self.sweep],
            "timings": self.timings,
            "figures": {name: f"figures/{name}.png" for name in self.figures},
            "dice": self.dice,
            "global_statistics": self.global_statistics,
        }
        return _jsonable(data)

    def to_markdown(self) -> str:
        """The Markdown report (figures referenced as ``figures/NAME.png``)."""
        return render_markdown(self.to_dict(), {n: f"figures/{n}.png" for n in self.figures})

    def to_html(self) -> str:
        """The self-contained HTML report."""
        return render_html(self.to_dict(), self.figures)

    def write(self, out: str | os.PathLike[str], *, overwrite: bool = False) -> dict[str, Path]:
        """Write ``report.json``, ``report.md``, ``report.html`` and ``figures/`` to ``out``.

        Returns the written paths by name: ``json``, ``markdown``, ``html`` and one per
        figure.
        """
        return write_report(self.to_dict(), self.figures, out, overwrite=overwrite)


def _mismatch_dict(mismatch: TileMismatch) -> dict[str, Any]:
    """The tile mismatch with the window whose sub-tiles differ most."""
    worst = max(mismatch.windows, key=lambda w: w["max_difference"])
    return {
        **mismatch.to_dict(),
        "worst_window": {
            "origin": list(worst["origin"]),
            "max_difference": float(worst["max_difference"]),
        },
    }


def _jsonable(value: Any) -> Any:
    """Plain Python types for json (numpy scalars, tuples), failing loudly on NaN."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise NahtlosError(
            f"the diagnosis produced a non-finite number ({value}); the model output contains "
            "NaN or infinity"
        )
    return value

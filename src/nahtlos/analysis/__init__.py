"""Measuring networks: Dice, tile mismatch, train/eval disparity, and the diagnosis
that bundles them with the receptive field into a report."""

from .diagnose import DiagnosisReport, diagnose
from .metrics import TileMismatch, TrainEvalDisparity, dice, tile_mismatch, train_eval_disparity

__all__ = [
    "DiagnosisReport",
    "TileMismatch",
    "TrainEvalDisparity",
    "diagnose",
    "dice",
    "tile_mismatch",
    "train_eval_disparity",
]

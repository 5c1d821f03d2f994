"""nahtlos: seamless tile-and-stitch segmentation of very large microscopy images."""

from __future__ import annotations

from .diagnose import DiagnosisReport, diagnose
from .errors import (
    BlockShapeError,
    FormatError,
    IncompleteOutputError,
    InputNotFoundError,
    NahtlosError,
    NahtlosWarning,
    ShapeMismatchError,
)
from .geometry import Block, BlockGrid
from .intensity import InputNormalization
from .io import open_image
from .metrics import TileMismatch, TrainEvalDisparity, dice, tile_mismatch, train_eval_disparity
from .predict import PredictionStats, predict_blockwise, predict_whole

__version__ = "0.1.0"

__all__ = [
    "Block",
    "BlockGrid",
    "BlockShapeError",
    "DiagnosisReport",
    "FormatError",
    "IncompleteOutputError",
    "InputNormalization",
    "InputNotFoundError",
    "NahtlosError",
    "NahtlosWarning",
    "PredictionStats",
    "ShapeMismatchError",
    "TileMismatch",
    "TrainEvalDisparity",
    "__version__",
    "diagnose",
    "dice",
    "open_image",
    "predict_blockwise",
    "predict_whole",
    "tile_mismatch",
    "train_eval_disparity",
]

"""nahtlos: seamless tile-and-stitch segmentation of very large microscopy images."""

from __future__ import annotations

from .distributed import PredictionReport, predict_file
from .errors import (
    BlockFailedError,
    BlockShapeError,
    FormatError,
    IncompleteOutputError,
    InputNotFoundError,
    NahtlosError,
    NahtlosWarning,
    ShapeMismatchError,
)
from .geometry import Block, BlockGrid
from .io import ImageSource, PredictionStore, open_image, open_source, save_image
from .predict import PredictionStats, predict_blockwise, predict_whole

__version__ = "0.1.0"

__all__ = [
    "Block",
    "BlockFailedError",
    "BlockGrid",
    "BlockShapeError",
    "FormatError",
    "ImageSource",
    "IncompleteOutputError",
    "InputNotFoundError",
    "NahtlosError",
    "NahtlosWarning",
    "PredictionReport",
    "PredictionStats",
    "PredictionStore",
    "ShapeMismatchError",
    "__version__",
    "open_image",
    "open_source",
    "predict_blockwise",
    "predict_file",
    "predict_whole",
    "save_image",
]

"""nahtlos: seamless tile-and-stitch segmentation of very large microscopy images."""

from __future__ import annotations

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
from .io import open_image
from .predict import PredictionStats, predict_blockwise, predict_whole
from .synth import (
    SYNTHETIC_DATASETS,
    SynthError,
    SynthSample,
    open_synthetic,
    semantic_classes,
    synthesize,
    write_synthetic,
)

__version__ = "0.1.0"

__all__ = [
    "SYNTHETIC_DATASETS",
    "Block",
    "BlockGrid",
    "BlockShapeError",
    "FormatError",
    "IncompleteOutputError",
    "InputNotFoundError",
    "NahtlosError",
    "NahtlosWarning",
    "PredictionStats",
    "ShapeMismatchError",
    "SynthError",
    "SynthSample",
    "__version__",
    "open_image",
    "open_synthetic",
    "predict_blockwise",
    "predict_whole",
    "semantic_classes",
    "synthesize",
    "write_synthetic",
]

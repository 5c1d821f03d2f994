"""nahtlos: seamless tile-and-stitch segmentation of very large microscopy images."""

from __future__ import annotations

from .autoblock import AutoGeometry, auto_geometry, choose_block
from .checkpoint import LoadedModel, load_model
from .config import ConfigError, TrainingConfig, load_config
from .data import PatchSampler, instances_to_semantic
from .diagnose import DiagnosisReport, diagnose
from .distributed import PredictionReport, predict_file
from .errors import (
    BlockFailedError,
    BlockShapeError,
    FormatError,
    IncompleteOutputError,
    InputNotFoundError,
    NahtlosError,
    NahtlosWarning,
    NormError,
    ShapeMismatchError,
)
from .experiments import PRESETS, ExperimentError, Preset, reproduce
from .geometry import Block, BlockGrid
from .global_stats import (
    GlobalNormStats,
    GlobalStatsError,
    compute_global_stats,
    freeze_norms,
    global_stats_model,
)
from .intensity import InputNormalization
from .io import ImageSource, PredictionStore, open_image, open_source, save_image
from .metrics import TileMismatch, TrainEvalDisparity, dice, tile_mismatch, train_eval_disparity
from .models import build_model
from .norms import (
    NORM_NAMES,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    RenormSchedule,
    _install_monai_hook,
    convert_norms,
    make_norm,
    monai_norm,
)
from .predict import PredictionStats, predict_blockwise, predict_whole
from .receptive_field import (
    Culprit,
    ReceptiveField,
    ReceptiveFieldError,
    plot_receptive_field,
    receptive_field,
    recommend_halo,
)
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

# `UNet(norm="batchrenorm")` must work after `import nahtlos`, without importing MONAI
# (seconds) when it is not used.
_install_monai_hook()

__all__ = [
    "NORM_NAMES",
    "PRESETS",
    "SYNTHETIC_DATASETS",
    "AutoGeometry",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "Block",
    "BlockFailedError",
    "BlockGrid",
    "BlockShapeError",
    "ConfigError",
    "Culprit",
    "DiagnosisReport",
    "ExperimentError",
    "FormatError",
    "GlobalNormStats",
    "GlobalStatsError",
    "ImageSource",
    "IncompleteOutputError",
    "InputNormalization",
    "InputNotFoundError",
    "LoadedModel",
    "NahtlosError",
    "NahtlosWarning",
    "NormError",
    "PatchSampler",
    "PredictionReport",
    "PredictionStats",
    "PredictionStore",
    "Preset",
    "ReceptiveField",
    "ReceptiveFieldError",
    "RenormSchedule",
    "ShapeMismatchError",
    "SynthError",
    "SynthSample",
    "TileMismatch",
    "TrainEvalDisparity",
    "TrainingConfig",
    "__version__",
    "auto_geometry",
    "build_model",
    "choose_block",
    "compute_global_stats",
    "convert_norms",
    "diagnose",
    "dice",
    "freeze_norms",
    "global_stats_model",
    "instances_to_semantic",
    "load_config",
    "load_model",
    "make_norm",
    "monai_norm",
    "open_image",
    "open_source",
    "open_synthetic",
    "plot_receptive_field",
    "predict_blockwise",
    "predict_file",
    "predict_whole",
    "receptive_field",
    "recommend_halo",
    "reproduce",
    "save_image",
    "semantic_classes",
    "synthesize",
    "tile_mismatch",
    "train_eval_disparity",
    "write_synthetic",
]

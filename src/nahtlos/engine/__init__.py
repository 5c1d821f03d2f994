"""The engine: block grids, block-wise prediction in process or on Dask, automatic
geometry, and exact whole-image statistics for tile-dependent networks.

Nothing outside this package knows how blocks are scheduled.
"""

from .autoblock import AutoGeometry, auto_geometry
from .distributed import PredictionReport, predict_file
from .geometry import Block, BlockGrid
from .global_stats import GlobalNormStats, compute_global_stats, freeze_norms, global_stats_model
from .predict import PredictionStats, predict_blockwise, predict_whole

__all__ = [
    "AutoGeometry",
    "Block",
    "BlockGrid",
    "GlobalNormStats",
    "PredictionReport",
    "PredictionStats",
    "auto_geometry",
    "compute_global_stats",
    "freeze_norms",
    "global_stats_model",
    "predict_blockwise",
    "predict_file",
    "predict_whole",
]

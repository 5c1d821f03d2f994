"""The engine: block grids, block-wise prediction in process or on Dask, automatic
geometry, and exact whole-image statistics for tile-dependent networks.

Nothing outside this package knows how blocks are scheduled.

- :mod:`~nahtlos.engine.geometry`: the block grid (pure, no torch);
- :mod:`~nahtlos.engine.predict`: any module over an array-like, block by block;
- :mod:`~nahtlos.engine.global_stats`: whole-image norm statistics, streamed;
- :mod:`~nahtlos.engine.autoblock`: block and halo from memory and receptive field;
- :mod:`~nahtlos.engine.inputs`: how a file is read for a block plan;
- :mod:`~nahtlos.engine.cluster`: the batches of a plan, in process or on Dask;
- :mod:`~nahtlos.engine.distributed`: :func:`predict_file`, a file into a file, resumably;
- :mod:`~nahtlos.engine.prepare`: a model file's settings filled in, as ``nahtlos predict`` does.
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

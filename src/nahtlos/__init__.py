"""nahtlos: seamless tile-and-stitch segmentation of very large microscopy images.

The names a user types are here; everything else is importable from its layer:
:mod:`nahtlos.io.files` (images in, predictions out), :mod:`nahtlos.nets` (norm layers,
models, receptive fields, model files), :mod:`nahtlos.engine` (block-wise prediction,
geometry, Dask, whole-image statistics), :mod:`nahtlos.training`,
:mod:`nahtlos.analysis` (metrics, diagnosis), :mod:`nahtlos.paper` (synthetic data,
experiments, demo), :mod:`nahtlos.errors` and :mod:`nahtlos.testing`.
See ``docs/architecture.md``.
"""

from __future__ import annotations

from ._version import __version__ as __version__
from .analysis import diagnose, tile_mismatch, train_eval_disparity
from .engine import (
    auto_geometry,
    compute_global_stats,
    global_stats_model,
    predict_blockwise,
    predict_file,
    predict_whole,
)
from .errors import NahtlosError, NahtlosWarning
from .io import InputNormalization, open_image, save_image
from .nets import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    RenormSchedule,
    build_model,
    convert_norms,
    load_model,
    make_norm,
    monai_norm,
    receptive_field,
    recommend_halo,
)
from .nets.norms import install_monai_hook
from .training import TrainingConfig, load_config, recalibrate_model, train

# `UNet(norm="batchrenorm")` must work after `import nahtlos`, without importing MONAI
# (seconds) when it is not used.
install_monai_hook()

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "InputNormalization",
    "NahtlosError",
    "NahtlosWarning",
    "RenormSchedule",
    "TrainingConfig",
    "auto_geometry",
    "build_model",
    "compute_global_stats",
    "convert_norms",
    "diagnose",
    "global_stats_model",
    "load_config",
    "load_model",
    "make_norm",
    "monai_norm",
    "open_image",
    "predict_blockwise",
    "predict_file",
    "predict_whole",
    "recalibrate_model",
    "receptive_field",
    "recommend_halo",
    "save_image",
    "tile_mismatch",
    "train",
    "train_eval_disparity",
]

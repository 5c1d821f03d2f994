"""Networks: normalization layers, models by name, receptive fields, model files.

Everything that knows how a norm layer works (BatchRenorm, conversion between kinds) or
how a model file is read lives here; the engine above only calls ``nn.Module``\\ s.
"""

from .checkpoint import LoadedModel, load_model, save_torchscript
from .convert import convert_norms
from .models import ModelConfig, build_model
from .norms import (
    NORM_NAMES,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    RenormSchedule,
    make_norm,
    monai_norm,
)
from .receptive_field import ReceptiveField, receptive_field, recommend_halo

__all__ = [
    "NORM_NAMES",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "LoadedModel",
    "ModelConfig",
    "ReceptiveField",
    "RenormSchedule",
    "build_model",
    "convert_norms",
    "load_model",
    "make_norm",
    "monai_norm",
    "receptive_field",
    "recommend_halo",
    "save_torchscript",
]

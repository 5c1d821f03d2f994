"""Training seamless networks: configuration, patches and targets, losses, the loop,
and population statistics of the norm layers after training."""

from .config import TrainingConfig, load_config
from .data import PatchSampler
from .loop import TrainResult, train
from .recalibrate import recalibrate_model

__all__ = [
    "PatchSampler",
    "TrainResult",
    "TrainingConfig",
    "load_config",
    "recalibrate_model",
    "train",
]

"""Training seamless networks: configuration, patches and targets, losses, the loop."""

from .config import TrainingConfig, load_config
from .data import PatchSampler
from .loop import TrainResult, train

__all__ = ["PatchSampler", "TrainResult", "TrainingConfig", "load_config", "train"]

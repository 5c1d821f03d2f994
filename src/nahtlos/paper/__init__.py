"""The paper's world: synthetic datasets, the experiment grid, the demo and its networks."""

from .experiments import PRESETS, reproduce
from .synth import SYNTHETIC_DATASETS, open_synthetic, synthesize, write_synthetic

__all__ = [
    "PRESETS",
    "SYNTHETIC_DATASETS",
    "open_synthetic",
    "reproduce",
    "synthesize",
    "write_synthetic",
]

"""Images in and predictions out: lazy readers, resumable writers, input normalization.

The lowest layer of nahtlos (above :mod:`nahtlos.errors`): it knows file formats and
intensities, nothing of networks.
"""

from .files import (
    ImageSource,
    PendingOutput,
    PredictionStore,
    check_output_path,
    open_image,
    open_source,
    save_image,
)
from .intensity import InputNormalization
from .labels import SEMANTIC_CLASSES, instances_to_semantic

__all__ = [
    "SEMANTIC_CLASSES",
    "ImageSource",
    "InputNormalization",
    "PendingOutput",
    "PredictionStore",
    "check_output_path",
    "instances_to_semantic",
    "open_image",
    "open_source",
    "save_image",
]

"""Images in and predictions out: lazy readers, resumable writers, input normalization.

The lowest layer of nahtlos (above :mod:`nahtlos.axes` and :mod:`nahtlos.errors`): it
knows file formats, intensities and label images, nothing of networks. The other layers
import from this package, not from its modules.
"""

from .files import (
    INPUT_FORMATS,
    OUTPUT_DTYPES,
    OUTPUT_FORMATS,
    ChunkCache,
    ImageSource,
    OutputDtype,
    PendingOutput,
    PredictionStore,
    Segmentation,
    check_output_path,
    open_image,
    open_source,
    remove_output,
    save_image,
    split_key,
)
from .intensity import InputNormalization, StreamingHistogram, streaming_percentiles
from .labels import SEMANTIC_CLASSES, BoundaryMode, instances_to_semantic

__all__ = [
    "INPUT_FORMATS",
    "OUTPUT_DTYPES",
    "OUTPUT_FORMATS",
    "SEMANTIC_CLASSES",
    "BoundaryMode",
    "ChunkCache",
    "ImageSource",
    "InputNormalization",
    "OutputDtype",
    "PendingOutput",
    "PredictionStore",
    "Segmentation",
    "StreamingHistogram",
    "check_output_path",
    "instances_to_semantic",
    "open_image",
    "open_source",
    "remove_output",
    "save_image",
    "split_key",
    "streaming_percentiles",
]

"""Images in and predictions out: lazy readers, resumable writers, input normalization.

The lowest layer of nahtlos (above :mod:`nahtlos.axes` and :mod:`nahtlos.errors`): it
knows file formats, intensities and label images, nothing of networks. The other layers
import from this package, not from its modules:

- :mod:`~nahtlos.io.formats`: suffixes, axis and unit conventions, output codecs;
- :mod:`~nahtlos.io.source`: :class:`ImageSource`, a lazy image with axes and pixel size;
- :mod:`~nahtlos.io.readers`: :func:`open_source`/:func:`open_image` for every input format;
- :mod:`~nahtlos.io.writers`: :func:`save_image`, :class:`PendingOutput`;
- :mod:`~nahtlos.io.store`: :class:`PredictionStore`, the resumable zarr output;
- :mod:`~nahtlos.io.multiscale`: its pyramid and OME-NGFF metadata;
- :mod:`~nahtlos.io.intensity`: input normalization (percentiles);
- :mod:`~nahtlos.io.labels`: instance to semantic labels.
"""

from .formats import (
    INPUT_FORMATS,
    OUTPUT_DTYPES,
    OUTPUT_FORMATS,
    OutputDtype,
    Segmentation,
    remove_output,
    split_key,
)
from .intensity import InputNormalization, StreamingHistogram, streaming_percentiles
from .labels import SEMANTIC_CLASSES, BoundaryMode, instances_to_semantic
from .readers import open_image, open_source
from .source import ChunkCache, ImageSource
from .store import PredictionStore
from .writers import PendingOutput, check_output_path, save_image

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

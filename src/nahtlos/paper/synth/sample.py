"""What a synthetic sample is: the dataset names, the semantic classes, the sample record.

The vocabulary every other module of :mod:`nahtlos.paper.synth` shares, with nothing of
how an image is generated: the error type, the per-axis check of user settings, the
``find_boundaries`` convention of the semantic classes, and the tile statistics that
show how hard a dataset is for tile-wise normalization.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...axes import as_per_axis
from ...errors import BlockShapeError, NahtlosError

__all__ = [
    "BACKGROUND",
    "BOUNDARIES",
    "FOREGROUND",
    "SYNTHETIC_DATASETS",
    "SynthError",
    "SynthSample",
    "check_dataset_name",
    "class_names",
    "per_axis",
    "semantic_classes",
    "tile_means",
]

SYNTHETIC_DATASETS = ("organoids", "plants", "embryo")
"""Names of the synthetic datasets."""

BACKGROUND, FOREGROUND, BOUNDARIES = 0, 1, 2


class SynthError(NahtlosError, ValueError):
    """Invalid parameters for a synthetic dataset (name, shape, seed, anisotropy, block)."""


def check_dataset_name(name: str) -> None:
    """Raise :class:`SynthError` unless ``name`` is one of :data:`SYNTHETIC_DATASETS`."""
    if name not in SYNTHETIC_DATASETS:
        raise SynthError(
            f"unknown synthetic dataset {name!r}; choose one of {', '.join(SYNTHETIC_DATASETS)}"
        )


def per_axis(value: int | Sequence[int], ndim: int, what: str) -> tuple[int, ...]:
    """:func:`nahtlos.axes.as_per_axis`, raising :class:`SynthError` (numpy ints accepted)."""
    if isinstance(value, np.integer):
        value = int(value)
    try:
        return as_per_axis(value, ndim, what)
    except BlockShapeError as err:
        raise SynthError(str(err)) from None


def class_names(name: str) -> tuple[str, str, str]:
    """Names of semantic classes 0, 1 and 2 of dataset ``name``."""
    check_dataset_name(name)
    first = "matrix" if name == "organoids" else "background"
    return (first, "foreground", "boundaries")


def semantic_classes(labels: np.ndarray) -> np.ndarray:
    """Semantic classes of an instance label image, by the ``find_boundaries`` convention.

    Returns ``uint8``: 2 = boundaries (``find_boundaries(labels, mode="thick")``),
    1 = foreground (objects minus boundaries), 0 = background (or matrix).
    """
    from skimage.segmentation import find_boundaries

    out = np.where(labels > 0, FOREGROUND, BACKGROUND).astype(np.uint8)
    out[find_boundaries(labels, mode="thick")] = BOUNDARIES
    return out


def tile_means(image: np.ndarray, tile: int | Sequence[int]) -> np.ndarray:
    """Mean intensity of every complete tile of a regular grid (partial tiles dropped).

    Useful to measure how much per-tile statistics vary over an image, the property
    that makes tile-wise normalization fragile.
    """
    tiles = per_axis(tile, image.ndim, "tile")
    counts = [s // t for s, t in zip(image.shape, tiles, strict=True)]
    if min(counts) < 1:
        raise SynthError(f"tile {tiles} is larger than image {image.shape}")
    crop = image[tuple(slice(0, c * t) for c, t in zip(counts, tiles, strict=True))]
    shape = [v for c, t in zip(counts, tiles, strict=True) for v in (c, t)]
    axes = tuple(range(1, 2 * image.ndim, 2))
    return crop.reshape(shape).mean(axis=axes, dtype=np.float64)


@dataclass
class SynthSample:
    """An image of a synthetic dataset with its ground truth.

    Attributes
    ----------
    name, seed, anisotropy
        What generated it.
    image
        ``uint8`` (organoids, EM) or ``uint16`` (fluorescence), axes ``[Z,]Y,X``.
    labels
        ``uint32`` instance labels (0 = background / matrix).
    semantic
        ``uint8`` classes (0 matrix, 1 foreground, 2 boundaries) for organoids, whose
        ground truth is semantic; ``None`` for the others (use :func:`semantic_classes`).
    """

    name: str
    seed: int
    anisotropy: float
    image: np.ndarray
    labels: np.ndarray
    semantic: np.ndarray | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size per axis in units of the XY pixel size."""
        return (self.anisotropy, 1.0, 1.0)[-self.image.ndim :]

    @property
    def class_names(self) -> tuple[str, str, str]:
        """Names of semantic classes 0, 1, 2."""
        return class_names(self.name)

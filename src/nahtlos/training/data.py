"""Training data: image/label volumes, semantic targets, splits and random patches.

Volumes are opened lazily with :func:`nahtlos.io.files.open_image` (TIFF, HDF5, zarr,
OME-Zarr, ``.npy``), so only sampled patches are ever read. Instance labels become
three semantic classes, in this channel order (:data:`SEMANTIC_CLASSES`):

- ``boundaries``: :func:`skimage.segmentation.find_boundaries` of the instances;
- ``foreground``: object pixels that are not boundaries;
- ``background``: everything else.

The conversion of a patch reads a one-pixel margin around it, so it equals the crop of
the conversion of the whole volume (boundaries only look at direct neighbours).
Semantic labels (``0..num_classes-1``) are one-hot encoded instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch

from ..axes import axis_names
from ..errors import ShapeMismatchError
from ..io import BoundaryMode, InputNormalization, instances_to_semantic, open_image

__all__ = [
    "PatchSampler",
    "RegionView",
    "Volume",
    "open_volume",
    "semantic_target",
    "split_volume",
]

LabelKind = Literal["instances", "semantic"]


def _one_hot(classes: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    lab = np.asarray(classes)
    if lab.dtype.kind not in "iub":
        raise ValueError(f"semantic labels {where} must be integers, got dtype {lab.dtype}")
    if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
        bad = int(lab.max()) if lab.max() >= num_classes else int(lab.min())
        raise ValueError(
            f"semantic labels {where} contain the value {bad}, outside 0..{num_classes - 1} "
            f"(data.num_classes = {num_classes})"
        )
    return (lab[None] == np.arange(num_classes).reshape((-1,) + (1,) * lab.ndim)).astype(np.uint8)


class RegionView:
    """A spatial sub-region of an array-like, sliceable like an array of its own.

    The array is ``(*spatial)`` or ``(C, *spatial)``; the view keeps a leading channel
    axis and offsets the spatial slices. Used to predict only the validation part.
    """

    def __init__(self, array: Any, region: Sequence[slice], channels: bool) -> None:
        self.array = array
        self.region = tuple(region)
        self.channels = channels
        lead = (int(array.shape[0]),) if channels else ()
        self.shape: tuple[int, ...] = lead + tuple(s.stop - s.start for s in self.region)
        self.dtype = array.dtype

    def __getitem__(self, key: Any) -> Any:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            key = tuple(slice(None) for _ in self.shape)
        lead: tuple[Any, ...] = ()
        if self.channels:
            lead, key = key[:1], key[1:]
        spatial = []
        for k, r in zip(key, self.region, strict=False):
            if not isinstance(k, slice):
                raise TypeError("RegionView takes slices only")
            start, stop, step = k.indices(r.stop - r.start)
            spatial.append(slice(r.start + start, r.start + stop, step))
        spatial += list(self.region[len(spatial) :])
        full = (*lead, *spatial)
        return self.array[full]


@dataclass
class Volume:
    """An image with its labels, and the spatial region of it that is used.

    Attributes
    ----------
    image
        ``(*spatial)`` or ``(C, *spatial)`` array-like.
    labels
        ``(*spatial)`` integer array-like (instances or classes).
    region
        The part used (the whole volume, or the training or validation part of a split).
    normalization
        Input normalization, fitted on the whole image for ``global`` mode.
    """

    image: Any
    labels: Any
    name: str
    ndim: int
    channels: bool
    region: tuple[slice, ...]
    normalization: InputNormalization = field(default_factory=InputNormalization)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the whole volume's spatial axes."""
        return tuple(int(s) for s in self.image.shape[-self.ndim :])

    @property
    def region_shape(self) -> tuple[int, ...]:
        """Shape of the used region."""
        return tuple(s.stop - s.start for s in self.region)

    @property
    def in_channels(self) -> int:
        """Number of image channels."""
        return int(self.image.shape[0]) if self.channels else 1

    def image_region(self) -> RegionView:
        """The used region of the image, as an array-like (with a leading channel axis
        when the image has one)."""
        return RegionView(self.image, self.region, self.channels)

    def read_image(self, region: Sequence[slice]) -> np.ndarray:
        """``(C, *region)`` float32 image values of an absolute spatial region,
        input-normalized (tile-wise normalization uses just this region)."""
        key = (slice(None), *region) if self.channels else tuple(region)
        values = np.asarray(self.image[key], dtype=np.float32)
        if not self.channels:
            values = values[None]
        return self.normalization(values)


def open_volume(
    image: str | Any,
    labels: str | Any,
    ndim: int,
    *,
    input_norm: InputNormalization | None = None,
    name: str | None = None,
    progress: bool = False,
) -> Volume:
    """Open an image/label pair (paths or array-likes) and fit its input normalization.

    Parameters
    ----------
    image, labels
        Paths (``file.h5:dataset`` and ``image.zarr:key`` name datasets) or array-likes.
        The image is ``(*spatial)`` or ``(C, *spatial)``; labels are ``(*spatial)``.
    ndim
        Spatial dimensions, 2 or 3.
    input_norm
        Input normalization (a copy is fitted on this image for ``global`` mode,
        out of core).

    Raises
    ------
    ShapeMismatchError
        If the label shape differs from the image's spatial shape, or the image has
        neither ``ndim`` nor ``ndim + 1`` axes.
    """
    img = open_image(image) if isinstance(image, str) else image
    lab = open_image(labels) if isinstance(labels, str) else labels
    label = name or (image if isinstance(image, str) else "volume")
    shape = tuple(int(s) for s in img.shape)
    names = ",".join(axis_names(ndim))
    if len(shape) not in (ndim, ndim + 1):
        raise ShapeMismatchError(
            f"image {label!r} has shape {shape}; a {ndim}D model needs ({names}) or (C,{names})"
        )
    spatial = shape[-ndim:]
    lab_shape = tuple(int(s) for s in lab.shape)
    if lab_shape != spatial:
        raise ShapeMismatchError(
            f"labels {labels if isinstance(labels, str) else '(array)'!r} have shape {lab_shape} "
            f"but image {label!r} has spatial shape {spatial} (image shape {shape}); "
            "labels need one value per image pixel"
        )
    norm = replace(input_norm) if input_norm is not None else InputNormalization()
    channels = len(shape) == ndim + 1
    if norm.mode == "global" and norm.values is None:
        norm.fit(img, channel_axis=0 if channels else None, progress=progress)
    region = tuple(slice(0, s) for s in spatial)
    return Volume(img, lab, str(label), ndim, channels, region, norm)


def split_volume(volume: Volume, fraction: float, axis: int) -> tuple[Volume, Volume]:
    """Split a volume's region along a spatial axis: the last ``fraction`` validates.

    Returns
    -------
    (train, validation)
        Views of the same arrays with complementary regions.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"split fraction {fraction} must be between 0 and 1")
    if not 0 <= axis < volume.ndim:
        raise ValueError(f"split axis {axis} is not one of the {volume.ndim} spatial axes")
    r = volume.region[axis]
    size = r.stop - r.start
    cut = r.start + round(size * (1 - fraction))
    if not r.start < cut < r.stop:
        raise ShapeMismatchError(
            f"volume {volume.name!r} has {size} pixels along axis {axis}: too few to split "
            f"off a fraction {fraction}"
        )
    train_region = tuple(
        slice(s.start, cut) if a == axis else s for a, s in enumerate(volume.region)
    )
    val_region = tuple(slice(cut, s.stop) if a == axis else s for a, s in enumerate(volume.region))
    return (
        replace(volume, region=train_region, name=f"{volume.name}[train]"),
        replace(volume, region=val_region, name=f"{volume.name}[val]"),
    )


def semantic_target(
    volume: Volume,
    region: Sequence[slice],
    labels: LabelKind = "instances",
    num_classes: int | None = None,
    boundary_mode: BoundaryMode = "thick",
) -> np.ndarray:
    """One-hot ``(K, *region)`` uint8 target for an absolute spatial region.

    Instance labels are read with a one-pixel margin (clipped at the volume border),
    so that the boundaries equal those of the whole volume's conversion.
    """
    region = tuple(region)
    if labels == "semantic":
        if num_classes is None:
            raise ValueError("semantic labels need num_classes")
        return _one_hot(np.asarray(volume.labels[region]), num_classes, f"of {volume.name!r}")
    shape = volume.spatial_shape
    outer = tuple(
        slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(region, shape, strict=True)
    )
    sem = instances_to_semantic(np.asarray(volume.labels[outer]), boundary_mode)
    crop = tuple(
        slice(s.start - o.start, s.stop - o.start) for s, o in zip(region, outer, strict=True)
    )
    key = (slice(None), *crop)
    return sem[key]


class PatchSampler:
    """Random training patches (image, one-hot target), reproducible from its state.

    A volume is drawn with probability proportional to its region's size, then a
    patch origin uniformly inside the region. With ``foreground_bias`` = p, a patch
    is, with probability p, redrawn (up to ``tries`` times) until it contains some
    annotated object (label != 0). Each spatial axis is flipped with probability 0.5.

    Parameters
    ----------
    volumes
        Training volumes (their regions are sampled).
    patch
        Patch shape per spatial axis.
    labels, num_classes, boundary_mode
        How labels become targets (see :func:`semantic_target`).
    foreground_bias
        Probability of insisting on a patch with objects.
    flips
        Random flips along every spatial axis.
    seed
        Seed of the sampler's own random generator (its state is checkpointed).

    Raises
    ------
    ShapeMismatchError
        If the patch does not fit in a volume's region.
    """

    def __init__(
        self,
        volumes: Sequence[Volume],
        patch: Sequence[int],
        *,
        labels: LabelKind = "instances",
        num_classes: int | None = None,
        boundary_mode: BoundaryMode = "thick",
        foreground_bias: float = 0.0,
        flips: bool = True,
        seed: int = 0,
        tries: int = 10,
    ) -> None:
        if not volumes:
            raise ValueError("no training volumes")
        self.volumes = list(volumes)
        self.patch = tuple(int(p) for p in patch)
        for v in self.volumes:
            if len(self.patch) != v.ndim:
                raise ShapeMismatchError(
                    f"patch {self.patch} has {len(self.patch)} axes but volume {v.name!r} has "
                    f"{v.ndim} spatial axes"
                )
            if any(p > r for p, r in zip(self.patch, v.region_shape, strict=True)):
                raise ShapeMismatchError(
                    f"patch {self.patch} does not fit in volume {v.name!r}, whose used region "
                    f"is {v.region_shape} (data.patch must be at most the region per axis)"
                )
        self.labels: LabelKind = labels
        self.num_classes = num_classes
        self.boundary_mode: BoundaryMode = boundary_mode
        self.foreground_bias = float(foreground_bias)
        self.flips = flips
        self.tries = max(int(tries), 1)
        sizes = np.array([math.prod(v.region_shape) for v in self.volumes], np.float64)
        self.weights = sizes / sizes.sum()
        self.rng = np.random.default_rng(seed)

    def _origin(self, vol: Volume) -> tuple[slice, ...]:
        starts = [
            int(self.rng.integers(r.start, r.stop - p + 1))
            for r, p in zip(vol.region, self.patch, strict=True)
        ]
        return tuple(slice(s, s + p) for s, p in zip(starts, self.patch, strict=True))

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        """One ``(C, *patch)`` float32 image and ``(K, *patch)`` float32 target."""
        vol = self.volumes[int(self.rng.choice(len(self.volumes), p=self.weights))]
        region = self._origin(vol)
        if self.foreground_bias > 0 and self.rng.random() < self.foreground_bias:
            for _ in range(self.tries - 1):
                if np.any(np.asarray(vol.labels[region]) != 0):
                    break
                region = self._origin(vol)
        image = vol.read_image(region)
        target = semantic_target(
            vol, region, self.labels, self.num_classes, self.boundary_mode
        ).astype(np.float32)
        if self.flips:
            for axis in range(vol.ndim):
                if self.rng.random() < 0.5:
                    image = np.flip(image, axis + 1)
                    target = np.flip(target, axis + 1)
        return np.ascontiguousarray(image), np.ascontiguousarray(target)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``size`` patches stacked into ``(N, C, *patch)`` and ``(N, K, *patch)`` tensors."""
        pairs = [self.sample() for _ in range(size)]
        return (
            torch.from_numpy(np.stack([p[0] for p in pairs])),
            torch.from_numpy(np.stack([p[1] for p in pairs])),
        )

    def state_dict(self) -> dict[str, Any]:
        """The random generator's state (plain Python values)."""
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state."""
        self.rng.bit_generator.state = state["rng"]

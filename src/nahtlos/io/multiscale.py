"""The multiscale pyramid of an OME-Zarr prediction and its OME-NGFF metadata.

How far each level is down-sampled (:func:`pyramid_factors`), how a level is pooled
from the one below (the mean for probabilities, the nearest voxel for labels), writing
levels chunk by chunk on Dask, and the ``multiscales``, ``omero`` and ``image-label``
metadata that make the group an image other OME-Zarr readers display.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from .formats import axes_dicts, ome_writer, output_compressors

__all__ = [
    "level_datasets",
    "mean_pool",
    "nearest",
    "pyramid_factors",
    "write_channel_metadata",
    "write_label_metadata",
    "write_pyramid",
]

# channel colours of the omero metadata, in order
_COLORS = ["FF00FF", "00FF00", "00FFFF", "FFFF00", "FF0000", "0000FF", "FFFFFF"]


def pyramid_factors(
    shape: tuple[int, ...],
    scale: tuple[float, ...],
    block: tuple[int, ...],
    levels: int | None,
) -> list[tuple[int, ...]]:
    """Per-level down-sampling factors (relative to the previous level) for each axis."""
    factors: list[tuple[int, ...]] = []
    current = list(shape)
    pixel = list(scale)
    limit = 8 if levels is None else levels
    while len(factors) < limit:
        if levels is None and max(current) <= max(block):
            break
        smallest = (
            min(p for p, n in zip(pixel, current, strict=True) if n > 1)
            if max(current) > 1
            else 1.0
        )
        step = tuple(
            2 if n > 1 and (len(shape) < 3 or i > 0 or p <= 1.5 * smallest) else 1
            for i, (n, p) in enumerate(zip(current, pixel, strict=True))
        )
        if all(s == 1 for s in step):
            break
        factors.append(step)
        current = [math.ceil(n / s) for n, s in zip(current, step, strict=True)]
        pixel = [p * s for p, s in zip(pixel, step, strict=True)]
    return factors


def mean_pool(x: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    """Average ``step``-sized boxes; a box cut by the border averages the pixels it has.

    Sums strided views into a float32 accumulator an eighth of the input's size, so
    that a chunk needs little memory beyond itself.
    """
    lead = x.ndim - len(step)
    spatial = x.shape[lead:]
    out_spatial = tuple(math.ceil(n / s) for n, s in zip(spatial, step, strict=True))
    total = np.zeros((*x.shape[:lead], *out_spatial), np.float32)
    count = np.zeros(out_spatial, np.float32)
    for offset in itertools.product(*(range(s) for s in step)):
        steps = [slice(o, None, s) for o, s in zip(offset, step, strict=True)]
        strided: tuple[Any, ...] = (Ellipsis, *steps)
        part = x[strided]
        region = tuple(slice(0, n) for n in part.shape[lead:])
        target: tuple[Any, ...] = (Ellipsis, *region)
        total[target] += part
        count[region] += 1
    mean = total / count
    if x.dtype.kind in "ui":
        return np.rint(mean).astype(x.dtype)
    return mean.astype(x.dtype, copy=False)


def nearest(x: np.ndarray, step: tuple[int, ...]) -> np.ndarray:
    """The first voxel of every ``step``-sized box (labels must not be averaged)."""
    lead = x.ndim - len(step)
    return x[(slice(None),) * lead + tuple(slice(None, None, s) for s in step)]


def write_pyramid(
    group: Any,
    factors: list[tuple[int, ...]],
    start: int,
    method: Literal["mean", "nearest"],
    scheduler: Any,
) -> None:
    """Write levels ``s{start}, ...`` from the level below, chunk by chunk.

    A level keeps the chunk shape of the level below, so each task reads the boxes
    of one output chunk (``step`` chunks per axis) and writes that chunk alone.
    """
    import dask.array as da

    for i in range(start, len(factors) + 1):
        step = factors[i - 1]
        prev = group[f"s{i - 1}"]
        lead = prev.ndim - len(step)
        chunk = prev.chunks[lead:]
        read = (*prev.shape[:lead], *(c * s for c, s in zip(chunk, step, strict=True)))
        source = da.from_zarr(prev, chunks=read)
        out_chunks = tuple(
            tuple(math.ceil(c / s) for c in axis_chunks)
            for axis_chunks, s in zip(source.chunks, (1,) * lead + step, strict=True)
        )
        func = mean_pool if method == "mean" else nearest
        level = source.map_blocks(func, step, chunks=out_chunks, dtype=prev.dtype)
        target = group.create_array(
            f"s{i}",
            shape=level.shape,
            chunks=prev.chunks,
            dtype=prev.dtype,
            fill_value=0,
            compressors=output_compressors(),
            dimension_names=prev.metadata.dimension_names,
            overwrite=True,
        )
        da.store(level, target, lock=False, compute=True, scheduler=scheduler)


def level_datasets(
    factors: Sequence[tuple[int, ...]],
    scale: tuple[float, ...],
    translation: tuple[float, ...],
    lead: list[float],
) -> list[dict[str, Any]]:
    """The ``datasets`` entries of levels ``s0, s1, ...``: each level's pixel size and origin.

    ``lead`` holds the scale of the axes in front of the spatial ones (the channel axis).
    """
    levels = [(1,) * len(scale)]
    for step in factors:
        levels.append(tuple(c * f for c, f in zip(levels[-1], step, strict=True)))
    return [
        {"path": f"s{i}", "coordinateTransformations": _transforms(c, lead, scale, translation)}
        for i, c in enumerate(levels)
    ]


def _transforms(
    cumulative: tuple[int, ...],
    lead: list[float],
    scale: tuple[float, ...],
    translation: tuple[float, ...],
) -> list[dict[str, Any]]:
    s = [*lead, *(sc * f for sc, f in zip(scale, cumulative, strict=True))]
    # a pooled pixel's centre lies half its extent minus half a pixel further in
    t = [0.0] * len(lead) + [
        t0 + (f - 1) * sc / 2 for t0, sc, f in zip(translation, scale, cumulative, strict=True)
    ]
    return [{"type": "scale", "scale": s}, {"type": "translation", "translation": t}]


def write_channel_metadata(
    group: Any, channel_names: Sequence[str], dtype: np.dtype[Any], fmt: Any
) -> None:
    """The ``omero`` metadata: a name, a colour and the value window of every channel."""
    window = (0, 255) if dtype == np.uint8 else (0.0, 1.0)
    ome_writer().add_metadata(
        group,
        {
            "omero": {
                "channels": [
                    {
                        "label": n,
                        "color": _COLORS[i % len(_COLORS)],
                        "active": True,
                        "window": {
                            "min": window[0],
                            "max": window[1],
                            "start": window[0],
                            "end": window[1],
                        },
                    }
                    for i, n in enumerate(channel_names)
                ],
                "rdefs": {"model": "color"},
            }
        },
        fmt=fmt,
    )


def write_label_metadata(
    labels_group: Any,
    name: str,
    datasets: list[dict[str, Any]],
    axes: tuple[str, ...],
    units: tuple[str | None, ...],
    channel_names: Sequence[str] | None,
    fmt: Any,
) -> None:
    """The metadata of label image ``name``: its levels, and a colour per label value.

    ``channel_names`` is given for an argmax label image (value ``v`` is channel ``v``,
    named in the properties); a thresholded channel has the values 0 and 1.
    """
    writer = ome_writer()
    writer.write_multiscales_metadata(
        labels_group[name], datasets, fmt=fmt, axes=axes_dicts(axes, units), name=name
    )
    values = [0, 1] if channel_names is None else list(range(len(channel_names)))
    writer.write_label_metadata(
        labels_group,
        name,
        colors=[{"label-value": v, "rgba": [0, 0, 0, 0] if v == 0 else _rgba(v)} for v in values],
        properties=None
        if channel_names is None
        else [{"label-value": v, "channel": channel_names[v]} for v in values] or None,
        fmt=fmt,
        source={"image": "../../"},
    )


def _rgba(value: int) -> list[int]:
    rng = np.random.default_rng(value)
    return [int(v) for v in rng.integers(64, 256, 3)] + [255]

"""Axis conventions shared by every layer: axis names, per-axis values, rounding.

Pure Python: the block grid (:mod:`nahtlos.engine.geometry`), the receptive-field probe
(:mod:`nahtlos.nets.receptive_field`) and the analyses all name axes and broadcast
per-axis settings the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import BlockShapeError

__all__ = ["as_per_axis", "axis_names", "round_up"]


def axis_names(ndim: int) -> tuple[str, ...]:
    """Names of the spatial axes of an ``ndim``-dimensional image (``X`` is last)."""
    names = ("T", "Z", "Y", "X")
    if ndim > len(names):
        return tuple(f"axis{i}" for i in range(ndim))
    return names[len(names) - ndim :]


def as_per_axis(value: int | Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
    """Broadcast an int to ``ndim`` axes, or check a sequence has ``ndim`` entries.

    Raises
    ------
    BlockShapeError
        If a sequence has the wrong length or an entry is not an integer.
    """
    if isinstance(value, bool):
        raise BlockShapeError(f"{name}={value!r} is not an integer")
    if isinstance(value, int | float):
        if int(value) != value:
            raise BlockShapeError(f"{name}={value!r} is not an integer")
        return (int(value),) * ndim
    values = tuple(value)
    if len(values) != ndim:
        raise BlockShapeError(
            f"{name}={values} has {len(values)} entries but the image has {ndim} spatial "
            f"axes ({','.join(axis_names(ndim))}); give one value per axis or a single value"
        )
    for v in values:
        if int(v) != v or isinstance(v, bool):
            raise BlockShapeError(f"{name}={values} contains the non-integer {v!r}")
    return tuple(int(v) for v in values)


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple`` (numpy integers accepted)."""
    return -(-int(value) // int(multiple)) * int(multiple)

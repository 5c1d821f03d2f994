"""Block geometry: the grid of inner blocks, halos and alignment over an N-D image.

Pure Python and numpy; nothing here knows about torch.

Conventions (see DESIGN.md §2): the image is conceptually zero-padded by the halo on
every side. Block ``i`` keeps the inner region ``[origin_i, origin_i + block)``
(clipped at the image border); its input window is that region grown by the halo on
every side, always of the full shape ``block + 2 * halo`` so that every window has
the same, aligned shape. Whatever part of a window lies outside the image is zero.
Block origins and halos are multiples of the alignment, so every window starts on the
network's down-sampling grid.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..axes import as_per_axis, axis_names, round_up
from ..errors import BlockShapeError, NahtlosWarning

__all__ = [
    "Block",
    "BlockGrid",
    "window_slices",
]


def window_slices(
    start: Sequence[int], shape: Sequence[int], image_shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Where a window of ``shape`` at ``start`` (image coordinates) meets the image.

    Returns
    -------
    source, target
        ``image[source]`` is the part of the window inside the image and lands at
        ``window[target]``; the rest of the window is zero padding. Along an axis where
        the window misses the image, ``source`` is empty (``stop <= start``).
    """
    source, target = [], []
    for a, w, n in zip(start, shape, image_shape, strict=True):
        lo, hi = max(a, 0), min(a + w, n)
        source.append(slice(lo, hi))
        target.append(slice(lo - a, hi - a))
    return tuple(source), tuple(target)


@dataclass(frozen=True)
class Block:
    """One inner block of a :class:`BlockGrid` and its input window.

    Attributes
    ----------
    index
        Position of the block in the grid.
    start, stop
        Inner region in image coordinates, ``stop`` clipped at the image border.
    halo
        Halo per axis.
    window_shape
        Shape of the input window (``block + 2 * halo``, the same for every block).
    """

    index: tuple[int, ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]
    halo: tuple[int, ...]
    window_shape: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the (clipped) inner region."""
        return tuple(b - a for a, b in zip(self.start, self.stop, strict=True))

    @property
    def inner(self) -> tuple[slice, ...]:
        """Slices of the inner region into the image (and into the output)."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))

    @property
    def window_start(self) -> tuple[int, ...]:
        """First voxel of the window in image coordinates (negative inside the padding)."""
        return tuple(a - h for a, h in zip(self.start, self.halo, strict=True))

    @property
    def window_stop(self) -> tuple[int, ...]:
        """End of the window in image coordinates (may lie beyond the image)."""
        return tuple(a + w for a, w in zip(self.window_start, self.window_shape, strict=True))

    def read_slices(
        self, image_shape: Sequence[int]
    ) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """Where the window meets the image.

        Returns
        -------
        source, target
            ``image[source]`` is the part of the window inside the image and lands at
            ``window[target]``; the rest of the window is zero padding.
        """
        return window_slices(self.window_start, self.window_shape, image_shape)

    @property
    def crop(self) -> tuple[slice, ...]:
        """Slices of the window's prediction that hold the inner region."""
        return tuple(slice(h, h + s) for h, s in zip(self.halo, self.shape, strict=True))


class BlockGrid:
    """A grid of inner blocks with a halo over an image of spatial shape ``shape``.

    Parameters
    ----------
    shape
        Spatial shape of the image, ``(Y, X)`` or ``(Z, Y, X)``.
    block
        Inner block shape, one value or one per axis. It is clipped to the image
        shape rounded up to the alignment, so small images make one small window.
    halo
        Context on every side of a block, one value or one per axis.
    alignment
        The network's total down-sampling factor, one value or one per axis.
        Blocks and halos must be multiples of it.
    auto
        If true, a block or halo that is not a multiple of the alignment is rounded
        up with a :class:`~nahtlos.errors.NahtlosWarning` instead of being rejected
        (used when the values were chosen automatically).

    Raises
    ------
    BlockShapeError
        If a value is not positive, has the wrong number of axes, or (unless ``auto``)
        is not a multiple of the alignment; the message names the axis, the value and
        the nearest values that would work.

    Examples
    --------
    >>> grid = BlockGrid((100, 70), block=32, halo=8, alignment=4)
    >>> grid.grid_shape, grid.window_shape, len(grid)
    ((4, 3), (48, 48), 12)
    """

    def __init__(
        self,
        shape: Sequence[int],
        block: int | Sequence[int],
        halo: int | Sequence[int] = 0,
        alignment: int | Sequence[int] = 1,
        *,
        auto: bool = False,
    ) -> None:
        shape = tuple(int(s) for s in shape)
        ndim = len(shape)
        if ndim == 0:
            raise BlockShapeError("the image has no spatial axes (shape ())")
        names = axis_names(ndim)
        for name, n in zip(names, shape, strict=True):
            if n < 1:
                raise BlockShapeError(f"the image shape {shape} is empty along axis {name}")
        block_t = as_per_axis(block, ndim, "block")
        halo_t = as_per_axis(halo, ndim, "halo")
        align_t = as_per_axis(alignment, ndim, "alignment")
        for name, a in zip(names, align_t, strict=True):
            if a < 1:
                raise BlockShapeError(f"alignment {a} along axis {name} must be at least 1")
        for name, b in zip(names, block_t, strict=True):
            if b < 1:
                raise BlockShapeError(f"block {b} along axis {name} must be at least 1")
        for name, h in zip(names, halo_t, strict=True):
            if h < 0:
                raise BlockShapeError(f"halo {h} along axis {name} must not be negative")

        block_t = self._aligned("block", block_t, align_t, names, auto)
        halo_t = self._aligned("halo", halo_t, align_t, names, auto)
        # A block larger than the (aligned) image only adds zeros to compute.
        block_t = tuple(
            min(b, round_up(n, a)) for b, n, a in zip(block_t, shape, align_t, strict=True)
        )
        self.shape: tuple[int, ...] = shape
        self.block: tuple[int, ...] = block_t
        self.halo: tuple[int, ...] = halo_t
        self.alignment: tuple[int, ...] = align_t

    @staticmethod
    def _aligned(
        what: str,
        values: tuple[int, ...],
        alignment: tuple[int, ...],
        names: tuple[str, ...],
        auto: bool,
    ) -> tuple[int, ...]:
        out = []
        rounded = []
        for name, v, a in zip(names, values, alignment, strict=True):
            if v % a == 0:
                out.append(v)
                continue
            down, up = (v // a) * a, round_up(v, a)
            if auto:
                rounded.append(
                    f"{what} {v} along axis {name} rounded up to {up}, the next multiple of "
                    f"the alignment {a}"
                )
                out.append(up)
                continue
            choices = f"{down} or {up}" if down > 0 else f"{up}"
            raise BlockShapeError(
                f"{what} {v} along axis {name} is not a multiple of the network's alignment "
                f"{a} (its total down-sampling factor); use {choices}, or pass auto values"
            )
        if rounded:  # one warning for all axes, not one per axis
            warnings.warn("; ".join(rounded), NahtlosWarning, stacklevel=4)
        return tuple(out)

    @property
    def ndim(self) -> int:
        """Number of spatial axes."""
        return len(self.shape)

    @property
    def window_shape(self) -> tuple[int, ...]:
        """Shape of every input window: ``block + 2 * halo``."""
        return tuple(b + 2 * h for b, h in zip(self.block, self.halo, strict=True))

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Number of blocks along each axis."""
        return tuple(math.ceil(n / b) for n, b in zip(self.shape, self.block, strict=True))

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """Shape of the zero-padded image that the whole-image reference runs on.

        The image padded by the halo on both sides, grown at the far end to a multiple
        of the alignment so that a down-sampling network accepts it.
        """
        return tuple(
            round_up(n + 2 * h, a)
            for n, h, a in zip(self.shape, self.halo, self.alignment, strict=True)
        )

    def __len__(self) -> int:
        return math.prod(self.grid_shape)

    def __iter__(self) -> Iterator[Block]:
        for index in itertools.product(*(range(g) for g in self.grid_shape)):
            yield self[index]

    def __getitem__(self, index: Sequence[int]) -> Block:
        index = tuple(int(i) for i in index)
        if len(index) != self.ndim or any(
            not 0 <= i < g for i, g in zip(index, self.grid_shape, strict=True)
        ):
            raise IndexError(f"block index {index} outside the grid {self.grid_shape}")
        start = tuple(i * b for i, b in zip(index, self.block, strict=True))
        stop = tuple(min(s + b, n) for s, b, n in zip(start, self.block, self.shape, strict=True))
        return Block(index, start, stop, self.halo, self.window_shape)

    def __repr__(self) -> str:
        return (
            f"BlockGrid(shape={self.shape}, block={self.block}, halo={self.halo}, "
            f"alignment={self.alignment}, blocks={len(self)})"
        )

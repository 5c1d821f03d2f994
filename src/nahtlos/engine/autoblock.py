"""Automatic block geometry: halo and alignment from the receptive field, block from memory.

When the user leaves ``block``, ``halo`` or ``alignment`` out, :func:`auto_geometry`
fills them in: the alignment and halo from :func:`~nahtlos.nets.receptive_field.receptive_field`
and :func:`~nahtlos.nets.receptive_field.recommend_halo`, the block as the largest one
whose prediction fits a memory budget.

The memory a window needs is measured, not guessed: one inference forward pass at
two window sizes is run while a dispatch mode counts the bytes of every tensor the
model allocates and frees (on CUDA, the allocator's peak), and a line through the two
peaks gives a fixed part (weights, workspaces) and a part per window voxel. The
prefetched input windows and the output windows waiting to be written are added.
The model's output channels come from the receptive-field probe when it ran (its
ERF passes run the model), so the two peak passes are the only ones made for memory.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch.utils._pytree import tree_flatten

from ..axes import as_per_axis, axis_names, round_up
from ..errors import BlockShapeError, NahtlosError
from ..nets.dispatch import ObservingMode
from ..nets.receptive_field import ReceptiveField, receptive_field, recommend_halo
from .geometry import BlockGrid
from .predict import model_device_dtype

__all__ = [
    "DEFAULT_MEMORY_FRACTION",
    "AutoGeometry",
    "MemoryModel",
    "auto_geometry",
    "available_memory",
    "choose_block",
    "format_bytes",
    "forward_peak_memory",
    "memory_model",
    "parse_memory",
]

#: Fraction of the free RAM (or free GPU memory) used when no budget is given.
DEFAULT_MEMORY_FRACTION = 0.5

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


def parse_memory(text: str | int) -> int:
    """Parse a memory size: ``"8G"``, ``"512MiB"``, ``"1.5GB"`` or a number of bytes.

    Raises
    ------
    ValueError
        If the text is not a positive size.
    """
    if isinstance(text, int):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(
                f"memory size {text!r} is not a number with an optional unit "
                "(e.g. 8G, 512MiB, 1.5GB, 1000000)"
            )
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return size


def format_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def available_memory(device: str | torch.device = "cpu") -> int:
    """Free memory on ``device``: free GPU memory for CUDA, available RAM otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    return int(psutil.virtual_memory().available)


class _PeakTracker(ObservingMode):
    """Counts live bytes of tensors allocated by ops (views and in-place ops add none)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        n = self.live.pop(key, None)
        if n is not None:
            self.current -= n

    def observe(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.live:
                continue
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            # PyTorch keeps a tensor's Python object alive as long as the tensor lives,
            # so this fires when the storage is released.
            weakref.finalize(t, self._free, key)


def forward_peak_memory(
    model: torch.nn.Module,
    in_channels: int,
    window: Sequence[int],
    *,
    batch_size: int = 1,
) -> int:
    """Peak bytes of one inference forward pass on ``batch_size`` windows, input included.

    Measured on the model's device: with the CUDA allocator's peak on a GPU, with a
    dispatch mode that tracks every tensor's allocation and release on the CPU.
    """
    dev, dtype = model_device_dtype(model)
    x = torch.rand((batch_size, in_channels, *window), dtype=dtype, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        with torch.inference_mode():
            model(x)
        torch.cuda.synchronize(dev)
        return int(torch.cuda.max_memory_allocated(dev) - before + x.nbytes)
    tracker = _PeakTracker()
    with torch.inference_mode(), tracker:
        out = model(x)
    del out
    return int(tracker.peak + x.nbytes)


@dataclass(frozen=True)
class MemoryModel:
    """Memory of block-wise prediction as a function of the window shape.

    ``fixed + per_voxel * prod(window)`` bytes for the forward pass of one batch,
    plus the windows in flight: ``prefetch`` batches of inputs read ahead and up to
    ``prefetch`` batches of outputs waiting to be written (float32).
    """

    fixed: float
    per_voxel: float
    in_channels: int
    out_channels: int
    batch_size: int
    prefetch: int = 2

    def forward_bytes(self, window: Sequence[int]) -> float:
        """Peak bytes of the forward pass of one batch of windows."""
        return self.fixed + self.per_voxel * math.prod(window)

    def total_bytes(self, window: Sequence[int]) -> float:
        """Forward pass plus the windows in flight."""
        in_flight = (
            (self.prefetch + 1)
            * self.batch_size
            * math.prod(window)
            * 4
            * (self.in_channels + self.out_channels)
        )
        return self.forward_bytes(window) + in_flight


def memory_model(
    model: torch.nn.Module,
    ndim: int,
    in_channels: int,
    alignment: int | Sequence[int] = 1,
    *,
    batch_size: int = 1,
    prefetch: int = 2,
    out_channels: int | None = None,
) -> MemoryModel:
    """Measure :class:`MemoryModel` of ``model`` by two forward passes (see module docs).

    Parameters
    ----------
    out_channels
        The model's output channels, if known (e.g.
        :attr:`~nahtlos.nets.receptive_field.ReceptiveField.out_channels`, seen by the
        receptive-field probe, which has also run the model already); otherwise a
        forward pass on the smaller window finds them.

    Raises
    ------
    NahtlosError
        If the model rejects both probe windows.
    """
    align = as_per_axis(alignment, ndim, "alignment")
    small = tuple(round_up(max(24, 2 * a), a) for a in align)
    large = tuple(2 * s for s in small)
    try:
        if out_channels is None:
            out_channels = _output_channels(model, in_channels, small)
        peaks = [
            forward_peak_memory(model, in_channels, w, batch_size=batch_size)
            for w in (small, large)
        ]
    except Exception as exc:
        raise NahtlosError(
            f"cannot measure the memory of the model on windows {small} and {large} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "give --block explicitly"
        ) from exc
    per_voxel = max(peaks[1] - peaks[0], 0) / (math.prod(large) - math.prod(small))
    fixed = max(peaks[0] - per_voxel * math.prod(small), 0.0)
    return MemoryModel(fixed, per_voxel, in_channels, out_channels, batch_size, prefetch)


def _output_channels(model: torch.nn.Module, in_channels: int, window: Sequence[int]) -> int:
    """Channels of the model's (first) output, by an inference forward pass on zeros."""
    dev, dtype = model_device_dtype(model)
    with torch.inference_mode():
        out = model(torch.zeros((1, in_channels, *window), dtype=dtype, device=dev))
    first = next(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
    return int(first.shape[1])


def choose_block(
    model: torch.nn.Module | MemoryModel,
    ndim: int,
    in_channels: int,
    halo: int | Sequence[int],
    alignment: int | Sequence[int],
    max_memory: int,
    image_shape: Sequence[int],
    *,
    batch_size: int = 1,
    prefetch: int = 2,
) -> tuple[int, ...]:
    """The largest block, as cubic as the image allows, whose prediction fits ``max_memory``.

    Blocks are multiples of the alignment and no larger than the image (rounded up
    to the alignment); among those that fit, the one with the longest common edge
    is chosen, which keeps the halo's share of the work small.

    Parameters
    ----------
    model
        The model (its memory is measured) or an already measured :class:`MemoryModel`.
    ndim, in_channels
        Spatial axes and input channels of the model.
    halo, alignment
        Per axis or one value.
    max_memory
        Budget in bytes for one forward pass plus the windows in flight.
    image_shape
        Spatial shape of the image.

    Raises
    ------
    BlockShapeError
        If not even a block of one alignment cell fits the budget.
    """
    halo_t = as_per_axis(halo, ndim, "halo")
    align_t = as_per_axis(alignment, ndim, "alignment")
    shape = tuple(int(s) for s in image_shape)
    mm = (
        model
        if isinstance(model, MemoryModel)
        else memory_model(
            model, ndim, in_channels, align_t, batch_size=batch_size, prefetch=prefetch
        )
    )
    limits = tuple(round_up(n, a) for n, a in zip(shape, align_t, strict=True))

    def block_for(edge: int) -> tuple[int, ...]:
        return tuple(min(round_up(edge, a), m) for a, m in zip(align_t, limits, strict=True))

    def fits(block: tuple[int, ...]) -> bool:
        window = tuple(b + 2 * h for b, h in zip(block, halo_t, strict=True))
        return mm.total_bytes(window) <= max_memory

    lo, hi = 1, max(limits)
    if not fits(block_for(lo)):
        smallest = block_for(lo)
        window = tuple(b + 2 * h for b, h in zip(smallest, halo_t, strict=True))
        raise BlockShapeError(
            f"even the smallest block {smallest} (window {window} with halo {halo_t}) needs "
            f"about {format_bytes(mm.total_bytes(window))}, more than the memory budget "
            f"{format_bytes(max_memory)}; raise --max-memory or use a smaller --batch-size"
        )
    while lo < hi:  # largest edge that fits; the memory grows with the edge
        mid = (lo + hi + 1) // 2
        if fits(block_for(mid)):
            lo = mid
        else:
            hi = mid - 1
    return block_for(lo)


@dataclass
class AutoGeometry:
    """Block, halo and alignment chosen by :func:`auto_geometry`, and why."""

    block: tuple[int, ...]
    halo: tuple[int, ...]
    alignment: tuple[int, ...]
    chosen: tuple[str, ...]
    receptive_field: ReceptiveField | None = None
    memory: MemoryModel | None = None
    max_memory: int | None = None

    @property
    def estimated_bytes(self) -> float | None:
        """Estimated memory of prediction with this geometry."""
        if self.memory is None:
            return None
        window = tuple(b + 2 * h for b, h in zip(self.block, self.halo, strict=True))
        return self.memory.total_bytes(window)

    def describe(self) -> str:
        """One line for the user: the values and where they came from."""

        def csv(v: Sequence[int]) -> str:
            return ",".join(str(x) for x in v)

        parts = []
        for name, value in (
            ("block", self.block),
            ("halo", self.halo),
            ("alignment", self.alignment),
        ):
            note = ""
            if name in self.chosen:
                if name == "block" and self.max_memory is not None:
                    est = self.estimated_bytes or 0.0
                    note = (
                        f" (auto: ~{format_bytes(est)} of a {format_bytes(self.max_memory)} budget)"
                    )
                elif name == "halo" and self.receptive_field is not None:
                    rf = self.receptive_field
                    note = " (auto: TRF radius)" if rf.exact else " (auto: ERF radius; NOT exact)"
                else:
                    note = " (auto)"
            parts.append(f"{name} {csv(value)}{note}")
        return "; ".join(parts)


def auto_geometry(
    model: torch.nn.Module,
    ndim: int,
    in_channels: int,
    image_shape: Sequence[int],
    *,
    block: int | Sequence[int] | None = None,
    halo: int | Sequence[int] | None = None,
    alignment: int | Sequence[int] | None = None,
    max_memory: int | None = None,
    batch_size: int = 1,
    prefetch: int = 2,
    mass: float = 0.99,
    progress: bool = False,
) -> AutoGeometry:
    """Fill in whichever of ``block``, ``halo`` and ``alignment`` is ``None``.

    Alignment and halo come from the model's measured receptive field (the halo of
    :func:`~nahtlos.nets.receptive_field.recommend_halo`, which warns for models that
    cannot be stitched exactly); the block from :func:`choose_block` with
    ``max_memory`` (default :data:`DEFAULT_MEMORY_FRACTION` of the free memory of the
    model's device). Values chosen here may not be multiples of an alignment the
    user gave; predict with ``auto=True`` (``BlockGrid(..., auto=True)``) to round
    them up.

    Raises
    ------
    BlockShapeError
        If no block fits the memory budget.
    NahtlosError
        If the receptive field or the memory cannot be measured.
    """
    chosen = []
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != ndim:
        raise BlockShapeError(
            f"image shape {shape} has {len(shape)} spatial axes but the model is {ndim}D "
            f"({','.join(axis_names(ndim))})"
        )
    rf = None
    if halo is None or alignment is None:
        rf = receptive_field(model, ndim, in_channels, progress=progress)
    if alignment is None:
        assert rf is not None
        align_t = rf.alignment
        chosen.append("alignment")
    else:
        align_t = as_per_axis(alignment, ndim, "alignment")
    if halo is None:
        assert rf is not None
        halo_t = recommend_halo(rf, mass)
        chosen.append("halo")
    else:
        halo_t = as_per_axis(halo, ndim, "halo")
    # Round now (the grid warns) so that the memory is estimated for the real window.
    grid_halo = BlockGrid(shape, align_t, halo_t, align_t, auto=True).halo
    mm = None
    budget = None
    if block is None:
        dev, _ = model_device_dtype(model)
        budget = (
            int(max_memory)
            if max_memory is not None
            else int(available_memory(dev) * DEFAULT_MEMORY_FRACTION)
        )
        # The receptive-field probe has run the model already: no forward pass just for
        # its output channels.
        mm = memory_model(
            model,
            ndim,
            in_channels,
            align_t,
            batch_size=batch_size,
            prefetch=prefetch,
            out_channels=None if rf is None else rf.out_channels,
        )
        block_t = choose_block(mm, ndim, in_channels, grid_halo, align_t, budget, shape)
        chosen.append("block")
    else:
        block_t = as_per_axis(block, ndim, "block")
    return AutoGeometry(
        block=block_t,
        halo=grid_halo,
        alignment=align_t,
        chosen=tuple(chosen),
        receptive_field=rf,
        memory=mm,
        max_memory=budget,
    )

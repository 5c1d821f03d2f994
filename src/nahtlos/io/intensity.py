"""Input normalization: percentile scaling, globally (out of core) or per tile.

``global`` scaling computes the low/high percentiles once over the whole image in one
streaming pass, so that every tile is scaled alike (seamless); ``tilewise`` scaling
computes them per tile (the input of every tile then depends on the whole tile, like
InstanceNorm does for features). The choice travels with a trained model.

The streaming percentiles are exact for integer images spanning up to 2**20 values
(every 8- and 16-bit image: a histogram of every value) and, for wider integer or float images, within one part in 10**4 of the value range: a histogram whose
bins double in width, merging exactly, when the range seen so far grows.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

__all__ = ["InputNormalization", "StreamingHistogram", "streaming_percentiles"]

_FLOAT_BINS = 1 << 18
# integer data spanning fewer values keeps one bin per value (exact percentiles)
_EXACT_RANGE = 1 << 20


class StreamingHistogram:
    """A histogram of values seen chunk by chunk, with exactly merging bins.

    Integer data spanning up to 2**20 values (every 8- and 16-bit image) keeps one bin
    per value, so its percentiles are exact; wider or float data keeps at most ``bins`` bins over a range
    that doubles (merging bins pairwise) as new values extend it.
    """

    def __init__(self, integer: bool, bins: int = _FLOAT_BINS) -> None:
        self.integer = integer
        self.bins = bins
        self.origin: float | None = None  # left edge of bin 0
        self.width = 1.0 if integer else 0.0
        self.counts = np.zeros(0, np.int64)
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    def update(self, values: np.ndarray) -> None:
        """Add the finite values of an array."""
        v = np.asarray(values).ravel()
        if v.dtype.kind == "f":
            v = v[np.isfinite(v)]
        if v.size == 0:
            return
        lo, hi = float(v.min()), float(v.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.count += int(v.size)
        if self.origin is None:
            self._start(lo, hi)
        self._cover(lo, hi)
        assert self.origin is not None
        idx = np.floor((v.astype(np.float64) - self.origin) / self.width).astype(np.int64)
        np.clip(idx, 0, self.counts.size - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.counts.size)

    def _start(self, lo: float, hi: float) -> None:
        if self.integer:
            self.origin = math.floor(lo)
            self.width = 1.0
            self.counts = np.zeros(int(hi - self.origin) + 1, np.int64)
            return
        span = hi - lo
        self.width = span / self.bins * 2 if span > 0 else max(abs(lo), 1.0) * 2.0**-40
        self.origin = math.floor(lo / self.width) * self.width
        self.counts = np.zeros(self.bins, np.int64)

    def _cover(self, lo: float, hi: float) -> None:
        assert self.origin is not None
        if self.integer and (hi - lo) < _EXACT_RANGE:
            # grow the one-bin-per-value histogram on either side
            left = int(self.origin - math.floor(lo)) if lo < self.origin else 0
            right = int(math.floor(hi) - (self.origin + self.counts.size - 1))
            if left > 0 or right > 0:
                self.counts = np.pad(self.counts, (max(left, 0), max(right, 0)))
                self.origin -= max(left, 0)
            if self.counts.size <= _EXACT_RANGE:
                return
        if self.integer:
            self.integer = False  # too wide for exact counts: fall back to merging bins
            self._coarsen_to(self.bins)
        while lo < self.origin or hi >= self.origin + self.width * self.counts.size:
            self._double()

    def _coarsen_to(self, bins: int) -> None:
        while self.counts.size > bins:
            self._double(keep_size=False)
        if self.counts.size < bins:
            self.counts = np.pad(self.counts, (0, bins - self.counts.size))

    def _double(self, keep_size: bool = True) -> None:
        """Double the bin width, keeping bin edges on the new, coarser grid."""
        assert self.origin is not None
        new_width = self.width * 2
        new_origin = math.floor(self.origin / new_width) * new_width
        shift = round((self.origin - new_origin) / self.width)  # 0 or 1
        counts = np.pad(self.counts, (shift, (shift + self.counts.size) % 2))
        merged = counts.reshape(-1, 2).sum(axis=1)
        if keep_size:
            # re-centre the range so that it can grow to both sides
            size = self.counts.size
            free = size - merged.size
            left = free // 2
            merged = np.pad(merged, (left, free - left))
            new_origin -= left * new_width
        self.counts, self.origin, self.width = merged, new_origin, new_width

    def percentiles(self, q: Sequence[float]) -> np.ndarray:
        """Percentiles with numpy's default (linear) interpolation between order statistics."""
        if self.count == 0 or self.origin is None:
            return np.full(len(q), np.nan)
        cum = np.cumsum(self.counts)
        out = []
        for p in q:
            pos = p / 100.0 * (self.count - 1)
            k0 = math.floor(pos)
            k1 = min(k0 + 1, self.count - 1)
            v0, v1 = self._order_statistic(cum, k0), self._order_statistic(cum, k1)
            out.append(v0 + (pos - k0) * (v1 - v0))
        return np.clip(np.asarray(out, np.float64), self.min, self.max)

    def _order_statistic(self, cum: np.ndarray, k: int) -> float:
        assert self.origin is not None
        b = int(np.searchsorted(cum, k, side="right"))
        if self.integer:
            return float(self.origin + b)
        # spread the values of a bin evenly over it
        before = int(cum[b - 1]) if b > 0 else 0
        inside = int(self.counts[b])
        frac = (k - before + 0.5) / inside
        return float(self.origin + (b + frac) * self.width)


def _chunk_slices(shape: Sequence[int], chunks: Sequence[int]) -> list[tuple[slice, ...]]:
    ranges = [range(0, s, c) for s, c in zip(shape, chunks, strict=True)]
    return [
        tuple(slice(o, min(o + c, s)) for o, c, s in zip(origin, chunks, shape, strict=True))
        for origin in itertools.product(*ranges)
    ]


def _default_chunks(array: Any) -> tuple[int, ...]:
    chunks = getattr(array, "chunks", None)
    shape = tuple(array.shape)
    if (
        isinstance(chunks, tuple)
        and len(chunks) == len(shape)
        and all(isinstance(c, int) for c in chunks)
    ):
        base = list(chunks)
    else:
        base = [1] * len(shape)
    # grow chunks along the leading axes up to about 16M values per read
    target = 1 << 24
    for axis in range(len(shape) - 1, -1, -1):
        other = math.prod(base) // base[axis]
        base[axis] = max(base[axis], min(shape[axis], max(1, target // max(other, 1))))
    return tuple(base)


def streaming_percentiles(
    image: Any,
    q: Sequence[float] = (1.0, 99.8),
    *,
    channel_axis: int | None = None,
    chunks: Sequence[int] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Percentiles of an array-like in one pass over chunks, never loading it whole.

    Parameters
    ----------
    image
        Any sliceable array-like (numpy, zarr, h5py, memory-mapped TIFF).
    q
        Percentiles in [0, 100].
    channel_axis
        If given, percentiles are computed per channel along this axis.
    chunks
        Read shape; defaults to the array's chunks, grown to about 16M values.
    progress
        Show a progress bar.

    Returns
    -------
    numpy.ndarray
        ``(len(q),)``, or ``(channels, len(q))`` with ``channel_axis``.
    """
    for p in q:
        if not 0 <= p <= 100:
            raise ValueError(f"percentile {p} is outside [0, 100]")
    shape = tuple(image.shape)
    integer = np.dtype(image.dtype).kind in "iub"
    n_channels = 1 if channel_axis is None else shape[channel_axis]
    hists = [StreamingHistogram(integer) for _ in range(n_channels)]
    read = tuple(chunks) if chunks is not None else _default_chunks(image)
    if channel_axis is not None:
        read = tuple(1 if a == channel_axis else c for a, c in enumerate(read))
    slices = _chunk_slices(shape, read)
    for key in tqdm(slices, desc="percentiles", unit="chunk", disable=not progress, leave=False):
        values = np.asarray(image[key])
        if channel_axis is None:
            hists[0].update(values)
        else:
            hists[key[channel_axis].start].update(values)
    result = np.stack([h.percentiles(q) for h in hists])
    return result[0] if channel_axis is None else result


NormMode = Literal["global", "tilewise", "none"]


@dataclass
class InputNormalization:
    """Percentile scaling of the input, per channel: ``(x - lo) / (hi - lo)``, clipped.

    Parameters
    ----------
    mode
        ``"global"`` (percentiles of the whole image, computed once with
        :meth:`fit`), ``"tilewise"`` (percentiles of each tile) or ``"none"``.
    low, high
        Percentiles (defaults 1 and 99.8, as in the paper).
    clip
        Clip the result to [0, 1].
    values
        The global ``(lo, hi)`` per channel, once fitted (or given).
    """

    mode: NormMode = "global"
    low: float = 1.0
    high: float = 99.8
    clip: bool = True
    values: list[tuple[float, float]] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.mode not in ("global", "tilewise", "none"):
            raise ValueError(
                f"input normalization mode {self.mode!r} is not one of 'global', 'tilewise', 'none'"
            )
        if not 0 <= self.low < self.high <= 100:
            raise ValueError(
                f"percentiles low={self.low}, high={self.high} must satisfy 0 <= low < high <= 100"
            )

    def fit(
        self,
        image: Any,
        channel_axis: int | None = None,
        progress: bool = False,
        chunks: Sequence[int] | None = None,
    ) -> InputNormalization:
        """Compute the global percentiles of ``image`` (out of core); returns ``self``.

        ``chunks`` is the shape of the pieces read at a time (default: the array's
        chunks grown to about 16M values); see :func:`streaming_percentiles`.
        """
        if self.mode == "global":
            p = streaming_percentiles(
                image,
                (self.low, self.high),
                channel_axis=channel_axis,
                chunks=chunks,
                progress=progress,
            )
            p = p.reshape(-1, 2)
            self.values = [(float(a), float(b)) for a, b in p]
        return self

    def __call__(self, region: np.ndarray) -> np.ndarray:
        """Scale a ``(C, *spatial)`` region; usable as ``input_transform`` of predict."""
        region = np.asarray(region, dtype=np.float32)
        if self.mode == "none":
            return region
        if self.mode == "global":
            if self.values is None:
                raise RuntimeError("global input normalization used before fit()")
            if len(self.values) not in (1, region.shape[0]):
                raise ValueError(
                    f"input normalization was fitted on {len(self.values)} channels but the "
                    f"region has {region.shape[0]}"
                )
            vals = self.values * region.shape[0] if len(self.values) == 1 else self.values
            lo = np.array([v[0] for v in vals], np.float32)
            hi = np.array([v[1] for v in vals], np.float32)
        else:
            flat = region.reshape(region.shape[0], -1)
            pct = np.percentile(flat, [self.low, self.high], axis=1).astype(np.float32)
            lo, hi = pct[0], pct[1]
        shape = (-1,) + (1,) * (region.ndim - 1)
        scale = np.maximum(hi - lo, np.float32(1e-8)).reshape(shape)
        out = (region - lo.reshape(shape)) / scale
        if self.clip:
            np.clip(out, 0.0, 1.0, out=out)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able description (saved with models and outputs)."""
        return {
            "mode": self.mode,
            "low": self.low,
            "high": self.high,
            "clip": self.clip,
            "values": None if self.values is None else [list(v) for v in self.values],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputNormalization:
        """Inverse of :meth:`to_dict`."""
        values = data.get("values")
        return cls(
            mode=data.get("mode", "global"),
            low=float(data.get("low", 1.0)),
            high=float(data.get("high", 99.8)),
            clip=bool(data.get("clip", True)),
            values=None if values is None else [(float(a), float(b)) for a, b in values],
        )

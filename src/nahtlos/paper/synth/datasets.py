"""The datasets by name: checked settings, the block plan, generation block by block.

:func:`make_generator` turns a name and user settings into a dataset's
:class:`~.generator.Generator`; :func:`default_block` chooses blocks within a voxel
budget; :func:`fill` generates every block of a :class:`~nahtlos.engine.BlockGrid`
into array-likes (in memory for :func:`synthesize`, on disk for
:func:`~.files.write_synthetic`), so memory stays bounded by the block, not the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ...engine import BlockGrid
from .embryo import Embryo
from .generator import Generator
from .organoids import Organoids
from .plants import Plants
from .sample import SynthError, SynthSample, check_dataset_name

__all__ = [
    "BLOCK_VOXELS",
    "GENERATORS",
    "default_block",
    "fill",
    "make_generator",
    "synthesize",
]

GENERATORS: dict[str, type[Generator]] = {
    "organoids": Organoids,
    "plants": Plants,
    "embryo": Embryo,
}
"""The generator class of each dataset."""

# voxels per generated block (core) before it is split, per number of dimensions
BLOCK_VOXELS = {2: 4096 * 4096, 3: 8 * 2**20}


def make_generator(name: str, shape: Sequence[int], seed: int, anisotropy: float) -> Generator:
    """The generator of dataset ``name`` for an image, after checking the settings.

    Raises
    ------
    SynthError
        For an unknown name, a shape of the wrong rank or below 8 voxels, a negative
        seed, or an anisotropy outside 0.1..10 (or other than 1 in 2D).
    """
    check_dataset_name(name)
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) not in (2, 3):
        raise SynthError(f"shape {shape_t} must have 2 (Y,X) or 3 (Z,Y,X) axes")
    if min(shape_t) < 8:
        raise SynthError(f"shape {shape_t} is too small: every axis needs at least 8 voxels")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SynthError(f"seed {seed!r} must be a non-negative integer")
    if not (0.1 <= anisotropy <= 10):
        raise SynthError(f"anisotropy {anisotropy} must be between 0.1 and 10 (Z step / XY pixel)")
    if len(shape_t) == 2 and anisotropy != 1:
        raise SynthError(
            f"anisotropy {anisotropy} applies to the Z axis of 3D shapes; shape {shape_t} is 2D"
        )
    return GENERATORS[name](shape_t, int(seed), float(anisotropy))


def default_block(
    shape: tuple[int, ...], unit: Sequence[int], margin: Sequence[int]
) -> tuple[int, ...]:
    """Block shape splitting ``shape`` evenly into the fewest blocks within the voxel budget.

    Blocks are multiples of ``unit`` per axis (the noise lattice or the output chunks).
    Each block is generated with ``margin`` voxels around it, so the axis split next is
    the one whose block is longest relative to its margin: blocks stay close to the
    shape that wastes least on margins.
    """
    budget = BLOCK_VOXELS[len(shape)]
    counts = [1] * len(shape)

    def size(a: int) -> int:
        n = math.ceil(shape[a] / counts[a])
        return min(shape[a], math.ceil(n / unit[a]) * unit[a])

    while math.prod(size(a) for a in range(len(shape))) > budget:
        candidates = [a for a in range(len(shape)) if size(a) > unit[a]]
        if not candidates:
            break
        counts[max(candidates, key=lambda a: size(a) / max(margin[a], 1))] += 1
    return tuple(size(a) for a in range(len(shape)))


def fill(gen: Generator, grid: BlockGrid, arrays: dict[str, Any], progress: bool) -> int:
    """Generate every block of ``grid`` into the array-likes ``image``, ``labels`` and,
    if given, ``semantic``; returns the number of objects seen."""
    seen = np.zeros(len(gen.objects) + 1, bool)
    for blk in tqdm(grid, desc=f"synth {gen.name}", disable=not progress):
        image, labels, semantic = gen.block(blk.start, blk.shape)
        arrays["image"][blk.inner] = image
        arrays["labels"][blk.inner] = labels
        if "semantic" in arrays:
            arrays["semantic"][blk.inner] = semantic
        seen[labels.ravel()] = True
    return int(seen[1:].sum())


def synthesize(
    name: str,
    shape: Sequence[int],
    *,
    seed: int = 0,
    anisotropy: float = 1.0,
    progress: bool = False,
) -> SynthSample:
    """Generate an image of a synthetic dataset in memory.

    Parameters
    ----------
    name
        ``"organoids"``, ``"plants"`` or ``"embryo"``.
    shape
        ``(Y, X)`` or ``(Z, Y, X)`` in voxels.
    seed
        Non-negative seed; the same seed and shape give the same arrays.
    anisotropy
        Z step in units of the XY pixel size (3D only): objects keep their physical
        size, so with ``anisotropy=4`` a nucleus spans 4 times fewer slices.
    progress
        Show a progress bar over generated blocks.

    Returns
    -------
    SynthSample
        Image, instance labels and (organoids) semantic classes.
    """
    gen = make_generator(name, shape, seed, anisotropy)
    arrays = {"image": np.empty(gen.shape, gen.dtype), "labels": np.empty(gen.shape, np.uint32)}
    if name == "organoids":  # the others' ground truth is their instance labels
        arrays["semantic"] = np.empty(gen.shape, np.uint8)
    align = gen.block_alignment()
    grid = BlockGrid(gen.shape, default_block(gen.shape, [align] * gen.ndim, gen.margin))
    fill(gen, grid, arrays, progress and len(grid) > 1)
    return SynthSample(
        name,
        int(seed),
        float(anisotropy),
        arrays["image"],
        arrays["labels"],
        arrays.get("semantic"),
    )

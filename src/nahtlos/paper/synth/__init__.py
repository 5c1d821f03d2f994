"""Synthetic microscopy datasets like the paper's three: organoids, plants and embryo.

Each generator builds, deterministically from a seed, an image and its instance labels
in 2D or 3D at any size, and carries the property that makes the paper's dataset hard
for tile-wise normalization:

``organoids`` (:mod:`.organoids`)
    FIB/SEM-like electron microscopy: densely packed cells (nuclei, organelles) whose
    membranes form the boundary class, beside large regions of textured extracellular
    matrix that are larger than a tile, so tiles full of cells and tiles full of matrix
    have very different statistics. Semantic classes: matrix, foreground (cell
    interior), boundaries (membranes).
``plants`` (:mod:`.plants`)
    Confocal fluorescence of dense, fairly homogeneous nuclei (bright chromocenters,
    dark nucleoli) filling the tissue: per-tile statistics vary little.
``embryo`` (:mod:`.embryo`)
    Confocal fluorescence of sparse nuclei with strong intensity heterogeneity:
    bright and dim regions, an illumination gradient, depth attenuation, mitotic
    nuclei and large empty background: per-tile statistics vary most.

Image formation is that of a microscope (:mod:`.generator`): a clean signal, blurred by
a Gaussian PSF (wider along Z), sampled with Z spacing ``anisotropy`` times the XY
pixel size, then Poisson (shot) noise plus Gaussian read noise and digitization to
``uint8`` (EM) or ``uint16`` (fluorescence).

Every value is a function of global coordinates only: object geometry is drawn once
per image, textures come from white noise on a fixed lattice of chunks, each seeded by
its chunk index, and smooth fields from a fixed coarse lattice (:mod:`.fields`). A
block therefore comes out bit-identical however the image is cut into blocks, which is
what lets :func:`write_synthetic` (:mod:`.files`) generate volumes far larger than
memory straight to disk.

Instance labels are consistent: each object is one face-connected component that
contains its anchor (its seed or centre), label 0 is background (or matrix), and the
semantic classes follow :func:`skimage.segmentation.find_boundaries` (``mode="thick"``):
boundaries, foreground = objects minus boundaries, background = the rest.
"""

from .datasets import synthesize
from .files import SynthWritten, open_synthetic, write_synthetic
from .preview import save_preview
from .sample import (
    BACKGROUND,
    BOUNDARIES,
    FOREGROUND,
    SYNTHETIC_DATASETS,
    SynthError,
    SynthSample,
    class_names,
    semantic_classes,
    tile_means,
)

__all__ = [
    "BACKGROUND",
    "BOUNDARIES",
    "FOREGROUND",
    "SYNTHETIC_DATASETS",
    "SynthError",
    "SynthSample",
    "SynthWritten",
    "class_names",
    "open_synthetic",
    "save_preview",
    "semantic_classes",
    "synthesize",
    "tile_means",
    "write_synthetic",
]

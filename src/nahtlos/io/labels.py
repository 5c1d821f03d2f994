"""Instance labels → semantic classes: boundaries, foreground, background.

Training targets and the Dice of a diagnosis against ground truth use the same classes,
in this channel order (:data:`SEMANTIC_CLASSES`):

- ``boundaries``: :func:`skimage.segmentation.find_boundaries` of the instances;
- ``foreground``: object pixels that are not boundaries;
- ``background``: everything else.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

__all__ = ["SEMANTIC_CLASSES", "BoundaryMode", "instances_to_semantic"]


SEMANTIC_CLASSES = ("boundaries", "foreground", "background")


BoundaryMode = Literal["thick", "inner", "outer"]


def instances_to_semantic(instances: np.ndarray, mode: BoundaryMode = "thick") -> np.ndarray:
    """One-hot boundaries / foreground / background of an instance label image.

    Parameters
    ----------
    instances
        Integer labels, 0 = background, one value per object, 2D or 3D.
    mode
        ``find_boundaries`` mode: ``thick`` (both sides of every border, the
        default), ``inner`` (object pixels only) or ``outer``.

    Returns
    -------
    numpy.ndarray
        ``(3, *instances.shape)`` uint8, channels in :data:`SEMANTIC_CLASSES` order;
        every pixel is in exactly one class.
    """
    from skimage.segmentation import find_boundaries

    lab = np.asarray(instances)
    if lab.dtype.kind not in "iub":
        raise ValueError(
            f"instance labels must be integers, got dtype {lab.dtype}; "
            "for class maps use labels: semantic"
        )
    boundaries = find_boundaries(lab, connectivity=1, mode=mode, background=0)
    foreground = (lab != 0) & ~boundaries
    background = ~(boundaries | foreground)
    return np.stack([boundaries, foreground, background]).astype(np.uint8)

"""Small networks trained by ``nahtlos train`` and shipped with the package.

Two 3D U-Nets of the same architecture (MONAI ``UNet``, channels 8-16-32, two
stride-2 levels, ~29 000 parameters), trained identically on the synthetic
``embryo`` dataset (:mod:`nahtlos.paper.synth`) to predict boundaries, foreground and
background, except for the feature norm:

``embryo-instance``
    InstanceNorm: normalizes with the statistics of each tile, so its block-wise
    prediction depends on the tiling (tile mismatch, seams).
``embryo-batchrenorm``
    Batch Renormalization: normalizes with global running statistics in training and
    inference alike, so block-wise prediction is exactly the whole-image prediction.

They are prediction-only checkpoints (:func:`nahtlos.nets.checkpoint.export_checkpoint`):
their configuration, input normalization, activation, halo and alignment travel
inside. The configurations and the commands that trained them are in the
repository's ``pretrained/`` folder and ``docs/pretrained.md`` (``make pretrained``).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ...errors import InputNotFoundError
from ...nets.checkpoint import LoadedModel, load_model

__all__ = ["PRETRAINED_MODELS", "load_pretrained", "pretrained_path"]

PRETRAINED_MODELS = ("embryo-instance", "embryo-batchrenorm")
"""Names of the shipped networks."""


def pretrained_path(name: str) -> Path:
    """The checkpoint file of a shipped network.

    Raises
    ------
    InputNotFoundError
        If ``name`` is not one of :data:`PRETRAINED_MODELS`, or its file is missing
        from the installation.
    """
    if name not in PRETRAINED_MODELS:
        raise InputNotFoundError(
            f"no pre-trained network {name!r}; nahtlos ships {', '.join(PRETRAINED_MODELS)}"
        )
    path = Path(str(resources.files(__package__).joinpath(f"{name}.pt")))
    if not path.is_file():
        raise InputNotFoundError(
            f"the pre-trained network {name!r} is missing from this installation ({path}); "
            "reinstall nahtlos, or retrain it with `make pretrained`"
        )
    return path


def load_pretrained(name: str, map_location: str = "cpu") -> LoadedModel:
    """Load a shipped network (in eval mode) with its metadata; see :func:`load_model`."""
    return load_model(pretrained_path(name), map_location=map_location)

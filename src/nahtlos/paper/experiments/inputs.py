"""What the cells of a run share: their data files, output classes and geometry.

The synthetic training and validation images of every dataset are written once into
the run folder (``data/<dataset>/``); every cell of an architecture predicts with the
same halo, alignment and window, measured once and stored in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...axes import round_up
from .presets import ExperimentError, Preset

__all__ = ["Geometry", "ImageFiles", "arch_geometry", "dataset_files", "output_classes"]


@dataclass(frozen=True)
class ImageFiles:
    """An image file and the file of its ground truth."""

    image: str
    labels: str


def output_classes(dataset: str) -> tuple[str, ...]:
    """Channel names of the network output for ``dataset``."""
    from ...io import SEMANTIC_CLASSES
    from ..synth import class_names

    # organoids: semantic ground truth 0 matrix, 1 foreground, 2 boundaries (one-hot in
    # that order); plants/embryo: instances -> boundaries, foreground, background
    return class_names(dataset) if dataset == "organoids" else SEMANTIC_CLASSES


def dataset_files(out: Path, preset: Preset, dataset: str) -> dict[str, list[ImageFiles]]:
    """Write (once) and name the training and validation images of ``dataset``."""
    from ..synth import write_synthetic

    folder = out / "data" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[ImageFiles]] = {"train": [], "val": []}
    plan = [("train", i, preset.seed + i, preset.train_shape) for i in range(preset.n_train)]
    plan += [("val", i, preset.seed + 1000 + i, preset.val_shape) for i in range(preset.n_val)]
    for split, i, seed, shape in plan:
        path = folder / f"{split}-{i}.tif"
        labels = folder / (
            f"{split}-{i}_semantic.tif" if dataset == "organoids" else f"{split}-{i}_labels.tif"
        )
        if not (path.exists() and labels.exists()):
            # written under temporary names and moved into place: never half-written
            write_synthetic(
                dataset,
                path,
                shape,
                seed=seed,
                anisotropy=preset.anisotropy,
                format="tif",
                overwrite=True,
                progress=False,
            )
        files[split].append(ImageFiles(str(path), str(labels)))
    return files


@dataclass(frozen=True)
class Geometry:
    """Prediction geometry of one architecture (the same for all its cells)."""

    halo: tuple[int, ...]
    alignment: tuple[int, ...]
    window: tuple[int, ...]  # the inference window = training patch

    @property
    def block(self) -> tuple[int, ...]:
        """The inner block: the window minus the halo on both sides."""
        return tuple(w - 2 * h for w, h in zip(self.window, self.halo, strict=True))

    def mismatch_window(self) -> tuple[tuple[int, ...], int]:
        """Tile-mismatch window and overlap whose two sub-tiles are inference windows.

        Along the split (last) axis the window is ``2P - 2h - v`` for sub-tiles of
        length P = the inference window, halo h and valid overlap v (a quarter of P,
        aligned); :func:`nahtlos.analysis.metrics.tile_mismatch` then cuts sub-tiles of exactly P.
        """
        p, h, a = self.window[-1], self.halo[-1], self.alignment[-1]
        v = round_up(max(a, p // 4), a)
        w = 2 * p - 2 * h - v
        return (*self.window[:-1], w), v

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (stored in the manifest and with each result)."""
        return {
            "halo": list(self.halo),
            "alignment": list(self.alignment),
            "window": list(self.window),
            "block": list(self.block),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`."""
        return cls(tuple(d["halo"]), tuple(d["alignment"]), tuple(d["window"]))


def arch_geometry(preset: Preset, arch: str) -> Geometry:
    """The halo of the paper: the TRF of the architecture with a global feature norm.

    For the U-Net the TRF radius of the same network with Identity norms, rounded up to
    its alignment (block-wise prediction is then exact for every global norm); the paper
    uses this halo for its InstanceNorm U-Nets too. For the UNETR (global attention) the
    halo crops a quarter of its window on every side.
    """
    from ...nets.models import build_model, model_alignment, unetr_halo

    a = preset.arch(arch)
    nd = preset.ndim
    if arch == "unetr":
        halo = unetr_halo(a.patch)
        align = (model_alignment("unetr"),) * nd
    else:
        from ...nets.receptive_field import receptive_field

        net = build_model("unet", nd, 1, 3, "identity", **dict(a.model))
        rf = receptive_field(net, nd, 1, erf_samples=1)
        halo = rf.halo()
        align = rf.alignment
    geo = Geometry(tuple(halo), tuple(align), tuple(a.patch))
    if any(b < al for b, al in zip(geo.block, geo.alignment, strict=True)):
        raise ExperimentError(
            f"{arch} patch {a.patch} is too small for the halo {geo.halo}: the inference "
            f"block (patch - 2 x halo) would be {geo.block}; use a larger patch"
        )
    return geo

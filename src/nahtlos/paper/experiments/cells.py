"""One cell end to end: train, evaluate, run the studies, write ``result.json``.

:func:`run_cell` takes plain arguments so that worker processes can run it. A cell is
done when its ``result.json`` holds the fingerprint of the preset and the cell
(:func:`load_result`); it is written atomically, last.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .cell_training import cell_config, recalibrated_checkpoint, train_cell
from .evaluation import evaluate_on, targets, volumes
from .inputs import Geometry, ImageFiles, dataset_files
from .presets import TRANSFER_DATASETS, Cell, Preset
from .studies import global_stats_study, stitched_arrays, tile_size_sweep

__all__ = ["cell_fingerprint", "load_result", "run_cell", "write_json"]


def cell_fingerprint(preset: Preset, cell: Cell) -> str:
    """What a result must carry to count for ``cell`` of ``preset``."""
    return hashlib.sha256(f"{preset.fingerprint()}/{cell.key}".encode()).hexdigest()[:16]


def write_json(path: Path, data: Any) -> None:
    """Write JSON under a temporary name and move it into place: never half-written."""
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_cell(out: str, preset_dict: dict[str, Any], cell_dict: dict[str, str]) -> dict[str, Any]:
    """Train and evaluate one cell; writes ``cells/<key>/result.json`` and returns it.

    A module-level function of plain arguments, so that worker processes can run it.
    """
    import torch

    from ...nets.checkpoint import load_model

    preset = Preset.from_dict(preset_dict)
    cell = Cell(**cell_dict)
    if preset.threads > 0:
        torch.set_num_threads(preset.threads)
    root = Path(out)
    manifest = json.loads((root / "manifest.json").read_text())
    geo = Geometry.from_dict(manifest["geometry"][cell.arch])
    folder = root / "cells" / cell.key
    folder.mkdir(parents=True, exist_ok=True)
    files = {d: dataset_files(root, preset, d) for d in preset.datasets}
    config = cell_config(preset, cell, files[cell.dataset], geo, folder / "train")
    ckpt, start, train_seconds, source = train_cell(root, preset, cell, config)

    t0 = time.perf_counter()
    loaded = load_model(ckpt)
    model, meta = loaded.module.eval(), loaded.metadata
    own = volumes(files[cell.dataset]["val"], preset.ndim, cell.input_norm)
    result: dict[str, Any] = {
        "cell": dataclasses.asdict(cell),
        "fingerprint": cell_fingerprint(preset, cell),
        "steps": preset.arch(cell.arch).steps,
        "resumed_from": start if start > 0 else None,
        "train_seconds": round(train_seconds, 2),
        "weights_from": source,
        "geometry": geo.to_dict(),
        "evaluations": _evaluations(model, meta, own, cell, files, geo, preset),
    }
    recalibrated = recalibrated_checkpoint(root, cell)
    if recalibrated is not None:
        again = load_model(recalibrated)
        result["recalibrated"] = {
            cell.dataset: evaluate_on(again.module, again.metadata, own, cell.dataset, geo, preset)
        }
    if cell.arch == "unet":
        result.update(_studies(model, meta, own, cell, geo, preset, result, folder))
    result["eval_seconds"] = round(time.perf_counter() - t0, 2)
    write_json(folder / "result.json", result)
    return result


def _evaluations(
    model: Any,
    meta: Mapping[str, Any],
    own: Sequence[Any],
    cell: Cell,
    files: Mapping[str, Mapping[str, Sequence[ImageFiles]]],
    geo: Geometry,
    preset: Preset,
) -> dict[str, Any]:
    """The cell on its own validation images and, for transfer U-Nets, on the other's."""
    evaluations = {cell.dataset: evaluate_on(model, meta, own, cell.dataset, geo, preset)}
    if cell.arch == "unet" and cell.dataset in TRANSFER_DATASETS:
        for other in TRANSFER_DATASETS:
            if other != cell.dataset and other in files:
                vols = volumes(files[other]["val"], preset.ndim, cell.input_norm)
                evaluations[other] = evaluate_on(model, meta, vols, other, geo, preset)
    return evaluations


def _studies(
    model: Any,
    meta: Mapping[str, Any],
    own: Sequence[Any],
    cell: Cell,
    geo: Geometry,
    preset: Preset,
    result: Mapping[str, Any],
    folder: Path,
) -> dict[str, Any]:
    """The tile-size sweep, whole-image statistics (InstanceNorm with global input
    normalization) and the stitched-prediction arrays (``stitched.npz``) of a U-Net."""
    from ...nets.state import activation_function

    act = activation_function(meta["activation"])
    gts = [targets(v, cell.dataset) for v in own]
    studies: dict[str, Any] = {
        "sweep": tile_size_sweep(model, own, gts, cell.dataset, geo, preset.sweep_windows, act)
    }
    if cell.norm == "instance" and cell.input_norm == "global":
        studies["global_stats"] = global_stats_study(
            model,
            own,
            gts,
            cell.dataset,
            geo,
            preset,
            act,
            meta["activation"],
            result["evaluations"][cell.dataset],
        )
    arrays = stitched_arrays(model, own[0], geo, act)
    np.savez_compressed(folder / "stitched.npz", **arrays)  # type: ignore[arg-type]
    return studies


def load_result(root: Path, preset: Preset, cell: Cell) -> dict[str, Any] | None:
    """The result of ``cell`` in run folder ``root`` if it is done with this preset."""
    path = root / "cells" / cell.key / "result.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("fingerprint") == cell_fingerprint(preset, cell) else None

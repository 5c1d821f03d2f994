"""The ``reproduce`` driver: prepare the run folder, schedule the cells, write outputs.

A run checks that its folder holds no run of another preset, writes the data and the
manifest (the preset and each architecture's geometry), runs every cell not yet done
(longest first, in worker processes; a cell that reuses another's training waits for
it), and rebuilds the CSVs, ``tables.md`` and figures from all finished cells.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .cells import load_result, run_cell, write_json
from .figures import plot_stitched, plot_sweep
from .inputs import arch_geometry, dataset_files
from .presets import PRESETS, Cell, ExperimentError, Preset, grid, shared_training
from .tables import (
    global_stats_rows,
    read_csv,
    result_rows,
    seed_means,
    seeds_markdown,
    sweep_rows,
    tables_markdown,
    write_csv,
)

__all__ = ["ReproduceResult", "reproduce", "reproduce_seeds", "write_outputs"]

# what is called with each cell and its result as it completes
CellDone = Callable[[Cell, dict[str, Any]], None]


@dataclass
class ReproduceResult:
    """What :func:`reproduce` did and wrote."""

    out: Path
    cells: list[Cell]
    ran: list[str] = field(default_factory=list)  # keys of cells (re)computed now
    skipped: list[str] = field(default_factory=list)  # keys of cells already done
    files: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)


def reproduce(
    preset: Preset | str = "quick",
    out: str | os.PathLike[str] = "nahtlos-reproduce",
    *,
    archs: Sequence[str] = ("unet", "unetr"),
    datasets: Sequence[str] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_cell_done: CellDone | None = None,
) -> ReproduceResult:
    """Run (or resume) the experiment grid and write its tables and figures.

    Parameters
    ----------
    preset
        ``"quick"``, ``"paper"`` or a :class:`~.presets.Preset`.
    out
        Output folder; a folder of an earlier run of the same preset is resumed.
    archs
        ``unet`` (Table 1) and/or ``unetr`` (Table 2).
    datasets
        A subset of the preset's datasets (default all).
    workers
        Cells trained in parallel processes (default the preset's).
    overwrite
        Start over in a folder that holds a run of another preset.
    on_cell_done
        Called with each cell and its result as it completes.

    Returns
    -------
    ReproduceResult

    Raises
    ------
    ExperimentError
        For an unknown preset, dataset or architecture, or an ``out`` of another preset.
    """
    t_start = time.perf_counter()
    preset = _resolve_preset(preset, datasets)
    cells = grid(preset, archs, datasets)
    root = Path(out)
    _prepare(root, preset, archs, overwrite)
    result = ReproduceResult(root, cells)
    results: dict[str, dict[str, Any]] = {}
    for cell in cells:
        done = load_result(root, preset, cell)
        if done is not None:
            results[cell.key] = done
            result.skipped.append(cell.key)
    bar = tqdm(
        total=len(cells), initial=len(results), desc="reproduce", unit="cell", disable=not progress
    )

    def finished(cell: Cell, res: dict[str, Any]) -> None:
        results[cell.key] = res
        result.ran.append(cell.key)
        bar.update(1)
        bar.set_postfix_str(cell.key)
        if on_cell_done is not None:
            on_cell_done(cell, res)

    todo = [c for c in cells if c.key not in results]
    n_workers = max(1, workers if workers is not None else preset.workers)
    try:
        _run_cells(root, preset, todo, n_workers, finished)
    finally:
        bar.close()
    _finish(result, preset, [results[c.key] for c in cells if c.key in results], t_start)
    return result


def _resolve_preset(preset: Preset | str, datasets: Sequence[str] | None) -> Preset:
    """The preset of that name, after checking ``datasets`` are among its datasets."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ExperimentError(f"unknown preset {preset!r}; choose {' or '.join(PRESETS)}")
        preset = PRESETS[preset]
    if datasets is not None:
        unknown = [d for d in datasets if d not in preset.datasets]
        if unknown:
            raise ExperimentError(
                f"dataset {unknown[0]!r} is not in preset {preset.name!r} "
                f"({', '.join(preset.datasets)})"
            )
    return preset


def _check_manifest(root: Path, preset: Preset, overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` clear) a folder that holds a run of another preset."""
    path = root / "manifest.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    if old.get("fingerprint") == preset.fingerprint():
        return
    if overwrite:
        shutil.rmtree(root / "cells", ignore_errors=True)
        shutil.rmtree(root / "data", ignore_errors=True)
        return
    raise ExperimentError(
        f"output folder {str(root)!r} holds a run of another preset ({old.get('preset', {}).get('name')!r}, "
        f"fingerprint {old.get('fingerprint')}); use another --out, or --overwrite to start over"
    )


def _prepare(root: Path, preset: Preset, archs: Sequence[str], overwrite: bool) -> None:
    """The run folder with the data of every dataset and the manifest.

    All datasets, not only those chosen: the transfer evaluation needs the others.
    The geometry of an architecture is measured once and kept in the manifest.
    """
    from ..._version import __version__

    root.mkdir(parents=True, exist_ok=True)
    _check_manifest(root, preset, overwrite)
    for d in preset.datasets:
        dataset_files(root, preset, d)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    geometry = dict(manifest.get("geometry", {}))
    for arch in archs:
        if arch not in geometry:
            geometry[arch] = arch_geometry(preset, arch).to_dict()
    write_json(
        manifest_path,
        {
            "preset": preset.to_dict(),
            "fingerprint": preset.fingerprint(),
            "nahtlos": __version__,
            "geometry": geometry,
        },
    )


def _cost(preset: Preset, cell: Cell) -> float:
    """Relative training cost of a cell (for scheduling the longest first)."""
    a = preset.arch(cell.arch)
    per = 8.0 if cell.arch == "unetr" else 1.0  # relative cost of a forward/backward pass
    return a.steps * a.accumulate * a.batch_size * per * math.prod(a.patch)


def _run_cells(
    root: Path, preset: Preset, todo: Sequence[Cell], workers: int, finished: CellDone
) -> None:
    """Run the cells ``todo``, longest first, calling ``finished`` as each completes.

    Cells that reuse another cell's training (:func:`~.presets.shared_training`) start
    when that cell is done.
    """
    first = sorted(todo, key=lambda c: -_cost(preset, c))  # longest first: better packing
    waiting: dict[Cell, list[Cell]] = {}
    for cell in list(first):
        source = shared_training(preset, cell)
        if source is not None and source in first:
            waiting.setdefault(source, []).append(cell)
            first.remove(cell)
    args = (str(root), preset.to_dict())
    if workers == 1:
        queue = list(first)
        while queue:
            cell = queue.pop(0)
            finished(cell, run_cell(*args, dataclasses.asdict(cell)))
            queue.extend(waiting.pop(cell, []))
        return
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a threaded torch
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: dict[Future[dict[str, Any]], Cell] = {
            pool.submit(run_cell, *args, dataclasses.asdict(c)): c for c in first
        }
        try:
            while pending:
                done_set, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done_set:
                    cell = pending.pop(fut)
                    finished(cell, fut.result())
                    for c in waiting.pop(cell, []):
                        pending[pool.submit(run_cell, *args, dataclasses.asdict(c))] = c
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _finish(
    result: ReproduceResult, preset: Preset, results: Sequence[dict[str, Any]], t_start: float
) -> None:
    """Write the outputs of all finished cells and append this run to ``timing.json``."""
    root = result.out
    result.files = write_outputs(root, results, preset)
    result.rows = result_rows(results)
    result.seconds = time.perf_counter() - t_start
    timing_path = root / "timing.json"
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"runs": []}
    timing["runs"].append(
        {
            "seconds": round(result.seconds, 1),
            "ran": len(result.ran),
            "skipped": len(result.skipped),
        }
    )
    write_json(timing_path, timing)


def write_outputs(
    root: Path, results: Sequence[Mapping[str, Any]], preset: Preset
) -> dict[str, Path]:
    """Write the CSVs, ``tables.md`` and the figures from cell results."""
    files: dict[str, Path] = {}
    rows = result_rows(results)
    if not rows:
        return files
    files["results.csv"] = write_csv(rows, root / "results.csv")
    gs = global_stats_rows(results)
    if gs:
        files["global_stats.csv"] = write_csv(gs, root / "global_stats.csv")
    sweep = sweep_rows(results)
    if sweep:
        files["sweep.csv"] = write_csv(sweep, root / "sweep.csv")
        files["sweep.png"] = plot_sweep(
            sweep, root / "sweep.png", training_window=preset.unet.patch[-1], gs_rows=gs
        )
    text = tables_markdown(read_csv(files["results.csv"]), gs, preset.datasets)
    tables = root / "tables.md"
    tables.write_text(f"Preset `{preset.name}` (fingerprint {preset.fingerprint()})\n\n{text}")
    files["tables.md"] = tables
    for d in preset.datasets:
        arrays = {}
        for res in results:
            c = res["cell"]
            path = root / "cells" / Cell(**c).key / "stitched.npz"
            if c["arch"] == "unet" and c["dataset"] == d and path.exists():
                with np.load(path) as z:
                    arrays[(c["norm"], c["input_norm"])] = {k: z[k] for k in z.files}
        if arrays:
            files[f"stitched-{d}.png"] = plot_stitched(arrays, d, root / f"stitched-{d}.png")
    return files


def reproduce_seeds(
    preset: Preset | str,
    out: str | os.PathLike[str],
    seeds: Sequence[int],
    **kwargs: Any,
) -> list[ReproduceResult]:
    """Run the grid once per training seed and write the seed means.

    Each seed runs :func:`reproduce` into ``out/seed-<s>`` with the preset's
    ``train_seed`` set to it (the same data; other initializations and patch orders);
    ``out/seeds.csv`` and ``out/seeds.md`` then hold the mean and the spread over the
    seeds of every row of ``results.csv``.
    """
    base = _resolve_preset(preset, kwargs.get("datasets"))
    if not seeds:
        raise ExperimentError("give at least one seed")
    root = Path(out)
    runs = [
        reproduce(dataclasses.replace(base, train_seed=int(s)), root / f"seed-{s}", **kwargs)
        for s in seeds
    ]
    rows = seed_means([r.rows for r in runs])
    write_csv(rows, root / "seeds.csv")
    text = seeds_markdown(rows, base.datasets)
    (root / "seeds.md").write_text(
        f"Preset `{base.name}`, training seeds {', '.join(str(s) for s in seeds)}: "
        f"eval-mode Dice, mean over seeds (min-max)\n\n{text}"
    )
    return runs

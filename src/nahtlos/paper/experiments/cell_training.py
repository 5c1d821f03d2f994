"""Training of one cell: its configuration, and training that resumes or is reused.

A cell's network is trained by :func:`nahtlos.training.loop.train` into
``cells/<cell>/train``. An interrupted training resumes from its newest checkpoint that
reads back; a finished one is not repeated; an InstanceNorm cell whose training equals
a BatchNorm cell's (:func:`~.presets.shared_training`) converts that network instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .inputs import Geometry, ImageFiles
from .presets import Cell, ExperimentError, Preset, shared_training

__all__ = ["cell_config", "final_checkpoint", "recalibrated_checkpoint", "train_cell"]


def cell_config(
    preset: Preset, cell: Cell, files: Mapping[str, Sequence[ImageFiles]], geo: Geometry, run: Path
) -> Any:
    """The validated training configuration of ``cell``, written into ``run``."""
    from ...training.config import validate_config

    a = preset.arch(cell.arch)
    organoids = cell.dataset == "organoids"
    data: dict[str, Any] = {
        "train": [{"image": f.image, "labels": f.labels} for f in files["train"]],
        "val": [{"image": f.image, "labels": f.labels} for f in files["val"]],
        "labels": "semantic" if organoids else "instances",
        "patch": list(a.patch),
        "flips": True,
        "foreground_bias": a.foreground_bias,
        "input_norm": {"mode": cell.input_norm},
    }
    if organoids:
        data["num_classes"] = 3
    train: dict[str, Any] = {
        "steps": a.steps,
        "batch_size": a.batch_size,
        "accumulate": a.accumulate,
        "lr": a.lr,
        "lr_schedule": a.lr_schedule,
        "loss": a.loss,
        "recalibrate": a.recalibrate,
        "recalibrate_method": a.recalibrate_method,
        # the same patches for every cell: only the norm differs
        "seed": preset.seed if preset.train_seed is None else preset.train_seed,
        "renorm": {"warmup_steps": a.warmup_steps, "ramp_steps": a.ramp_steps},
        "val_every": preset.val_every,
        "val_batch_size": 1,
        "checkpoint_every": preset.checkpoint_every,
        "device": preset.device,
    }
    if cell.arch == "unet":
        train["val_block"] = list(geo.block)
    model = {"arch": cell.arch, "ndim": preset.ndim, "norm": cell.norm, **dict(a.model)}
    return validate_config(
        {"data": data, "model": model, "train": train, "out": str(run)}, f"cell {cell.key}"
    )


def ends_with_recalibration(preset: Preset, cell: Cell) -> bool:
    """Whether the training of ``cell`` ends with a recalibration step (that writes
    ``model.pt`` after the last checkpoint)."""
    return preset.arch(cell.arch).recalibrate not in (0, "0")


def _checkpoint_step(path: Path) -> int:
    """The optimizer step of a checkpoint file ``step-NNNNNN.pt``."""
    return int(path.stem.split("-")[-1])


def recalibrated_checkpoint(root: Path, cell: Cell) -> Path | None:
    """The final network of ``cell`` with recalibrated norm statistics, if training made
    one (BatchNorm/BatchRenorm cells of a preset that recalibrates)."""
    from ...nets.checkpoint import read_checkpoint

    path = root / "cells" / cell.key / "train" / "model.pt"
    if not path.exists():
        return None
    return path if "recalibration" in read_checkpoint(path).get("prediction", {}) else None


def final_checkpoint(root: Path, preset: Preset, cell: Cell) -> Path:
    """The checkpoint a finished training of ``cell`` leaves in run folder ``root``."""
    steps = preset.arch(cell.arch).steps
    return root / "cells" / cell.key / "train" / "checkpoints" / f"step-{steps:06d}.pt"


def train_cell(
    root: Path, preset: Preset, cell: Cell, config: Any
) -> tuple[Path, int, float, str | None]:
    """Train (or resume, or skip) a cell.

    Returns the final checkpoint, the step training started from, its seconds, and the
    key of the cell whose training was reused (see :func:`~.presets.shared_training`).
    """
    from ...nets.checkpoint import convert_checkpoint
    from ...training.loop import train

    steps = preset.arch(cell.arch).steps
    run = root / "cells" / cell.key / "train"
    final = final_checkpoint(root, preset, cell)
    if final.exists():
        if ends_with_recalibration(preset, cell) and not (run / "model.pt").exists():
            # interrupted after the last step, before the final network was written:
            # resuming at the last step only recalibrates
            with (run / "train.log").open("a") as log, contextlib.redirect_stdout(log):
                train(config, resume=final, out_dir=run, progress=False)
        return final, steps, 0.0, None
    source = shared_training(preset, cell)
    if source is not None and final_checkpoint(root, preset, source).exists():
        converted = run / f"from-{source.key}.pt"
        if not converted.exists():  # written atomically
            run.mkdir(parents=True, exist_ok=True)
            convert_checkpoint(final_checkpoint(root, preset, source), converted, cell.norm)
        return converted, steps, 0.0, source.key
    resume = _resume_point(run, steps)
    run.mkdir(parents=True, exist_ok=True)
    # train() reports validation on stdout; keep it in the run folder, not the console
    with (run / "train.log").open("a") as log, contextlib.redirect_stdout(log):
        result = train(config, resume=resume, out_dir=run, progress=False)
    if not final.exists():
        raise ExperimentError(f"training of {cell.key} ended without {final}")
    return final, result.start_step, result.seconds, None


def _resume_point(run: Path, steps: int) -> Path | None:
    """The newest checkpoint before step ``steps`` in ``run`` that reads back, if any."""
    from ...errors import FormatError
    from ...nets.checkpoint import read_checkpoint

    done = sorted(
        (p for p in (run / "checkpoints").glob("step-*.pt") if _checkpoint_step(p) < steps),
        key=_checkpoint_step,
    )
    for candidate in reversed(done):
        try:
            read_checkpoint(candidate)
        except (FormatError, OSError, RuntimeError):
            continue
        return candidate
    return None

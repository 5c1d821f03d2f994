"""Training: the optimizer loop, checkpoints, exact resume, recalibration at the end.

The recipe: Adam, batch size x gradient accumulation, random patches (a share of them
insisting on objects, ``data.foreground_bias``) with random flips, a loss by name
(``train.loss``: by default Dice over the classes present in the patch plus
cross-entropy; ``dice`` is the paper's, Appendix A), a learning rate by schedule
(``train.lr_schedule``), and for BatchRenorm the r_max/d_max schedule stepped once per
*optimizer* step. Validation predicts the validation region block-wise, in eval mode and
in train mode on the very same windows (:mod:`.validation`), and leaves the model as it
found it. At the end, BatchNorm/BatchRenorm running statistics are replaced by population
statistics of the final network (``train.recalibrate``, :mod:`.recalibrate`).

A run writes into its output folder::

    config.yaml             the resolved configuration (defaults filled in)
    log.csv                 step, loss, lr, seconds, r_max, d_max per optimizer step
    validation.csv          step, dice_eval_<class>, dice_train_<class>, disparity_<class>
    recalibration.json      validation before and after recalibration (if any)
    curves.png              loss and validation Dice against steps
    checkpoints/step-N.pt   checkpoints with the moving averages (resume from these)
    model.pt                the final network: ``nahtlos predict model.pt ...``

Resuming from a checkpoint restores weights, optimizer, schedule, the patch sampler
and every random state, so the resumed run continues exactly as if never interrupted
(bit-identical losses on CPU with the same seed and thread count).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine.predict import resolve_device
from ..errors import ShapeMismatchError
from ..io import SEMANTIC_CLASSES
from ..nets.checkpoint import measured_geometry, read_checkpoint, restore_rng_state, save_checkpoint
from ..nets.models import model_alignment, model_from_config, unetr_halo
from ..nets.norms import RenormSchedule
from .config import TrainingConfig, dump_config, upgrade_config, validate_config
from .data import PatchSampler, Volume, open_volume, split_volume
from .logs import CsvLog, plot_curves
from .losses import loss_function
from .recalibrate import (
    recalibrate_model,
    recalibrates_by_default,
    running_stat_layers,
    volume_tiles,
)
from .schedules import learning_rate
from .validation import validate

__all__ = [
    "TrainResult",
    "class_names",
    "prediction_metadata",
    "train",
    "validate",
]


def class_names(config: TrainingConfig) -> tuple[str, ...]:
    """Names of the predicted channels."""
    if config.data.labels == "instances":
        return SEMANTIC_CLASSES
    return tuple(f"class{i}" for i in range(config.out_channels))


def prediction_metadata(
    config: TrainingConfig, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    """What prediction needs to know about a trained network (stored in checkpoints).

    For a U-Net, the halo, alignment and tile dependence are measured on the network
    (:func:`~nahtlos.nets.receptive_field.receptive_field`, :func:`recommend_halo`): the
    theoretical receptive-field radius rounded up to the alignment (10 -> 12 for the
    paper's U-Net), or for tile-dependent norms the radius holding 99% of the effective
    receptive field. A UNETR (global attention) is tile-dependent and its window is fixed
    to the training patch; its halo crops a quarter of the window on each side
    (:func:`~nahtlos.nets.models.unetr_halo`), since its effective receptive field spans the
    whole window. Tile-wise input normalization makes any network tile-dependent.

    Parameters
    ----------
    config
        The configuration.
    model
        The network (built from ``config`` if not given); it is not changed.
    """
    m = config.model
    nd = m.ndim
    assert config.data.patch is not None
    patch = tuple(config.data.patch)
    window: tuple[int, ...] | None = None
    if m.arch == "unet":
        with torch.random.fork_rng(devices=[]):  # must not move the training RNG
            net = model if model is not None else model_from_config(m, config.out_channels, patch)
        measured = measured_geometry(net, nd, m.in_channels)
        halo = tuple(measured["halo"])
        align = tuple(measured["alignment"])
        tile_dependent = measured["tile_dependent"]
        block = tuple(config.train.val_block or patch)
    else:
        halo = unetr_halo(patch)
        align = (model_alignment(m.arch),) * nd
        tile_dependent = True
        window = patch
        block = tuple(p - 2 * h for p, h in zip(patch, halo, strict=True))
    norm = config.data.input_norm
    return {
        "arch": m.arch,
        "norm": m.norm,
        "ndim": nd,
        "in_channels": m.in_channels,
        "out_channels": config.out_channels,
        "classes": list(class_names(config)),
        # how ground truth becomes the classes: "instances" (boundaries/foreground/
        # background via find_boundaries with this mode) or "semantic" (class indices)
        "labels": config.data.labels,
        "boundary_mode": config.data.boundary_mode,
        "activation": m.activation,
        "halo": list(halo),
        "alignment": list(align),
        "block": list(block),
        "window": None if window is None else list(window),
        "input_normalization": norm.build().to_dict(),
        # Tile-wise statistics (instance/group norm, tile-wise input scaling, attention)
        # make every output depend on the whole window: no halo stitches them exactly.
        "tile_dependent": bool(tile_dependent or norm.mode == "tilewise"),
    }


# ---------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What a :func:`train` call did."""

    out_dir: Path
    checkpoint: Path
    start_step: int
    steps: int
    losses: list[float] = field(default_factory=list)
    validation: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    recalibration: dict[str, Any] | None = None
    class_names: tuple[str, ...] = ()


def _volumes(config: TrainingConfig, progress: bool) -> tuple[list[Volume], list[Volume]]:
    d = config.data
    nd = config.model.ndim
    norm = d.input_norm.build()
    train_vols = [
        open_volume(v.image, v.labels, nd, input_norm=norm, progress=progress) for v in d.train
    ]
    val_vols = [
        open_volume(v.image, v.labels, nd, input_norm=norm, progress=progress) for v in d.val
    ]
    if d.split is not None:
        axis = config.split_axis()
        assert axis is not None
        tr, va = split_volume(train_vols[d.split.volume], d.split.fraction, axis)
        train_vols[d.split.volume] = tr
        val_vols.insert(0, va)
    for i, v in enumerate(train_vols + val_vols):
        if v.in_channels != config.model.in_channels:
            group = "train" if i < len(train_vols) else "val"
            raise ShapeMismatchError(
                f"image {v.name!r} ({group}) has {v.in_channels} channels (shape "
                f"{tuple(v.image.shape)}) but model.in_channels is {config.model.in_channels}"
            )
    return train_vols, val_vols


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (third-party code may use it)
    torch.manual_seed(seed)


def _renorm_schedule(config: TrainingConfig) -> RenormSchedule | None:
    if config.model.norm != "batchrenorm":
        return None
    warm, ramp = config.train.warmup_and_ramp()
    r = config.train.renorm
    return RenormSchedule(warm, ramp, r_max=r.r_max, d_max=r.d_max)


def _sampler(
    config: TrainingConfig, volumes: Sequence[Volume], seed: int, flips: bool
) -> PatchSampler:
    assert config.data.patch is not None
    return PatchSampler(
        volumes,
        config.data.patch,
        labels=config.data.labels,
        num_classes=config.data.num_classes,
        boundary_mode=config.data.boundary_mode,
        foreground_bias=config.data.foreground_bias,
        flips=flips,
        seed=seed,
    )


class _Run:
    """One training run: data, network, optimizer and logs, stepped by :func:`train`."""

    def __init__(self, config: TrainingConfig, out: Path, progress: bool) -> None:
        cfg_t = config.train
        self.config, self.out, self.progress = config, out, progress
        self.device = resolve_device(cfg_t.device)
        _seed_everything(cfg_t.seed)
        self.train_vols, self.val_vols = _volumes(config, progress)
        self.sampler = _sampler(config, self.train_vols, cfg_t.seed, config.data.flips)
        self.model = model_from_config(config.model, config.out_channels, config.data.patch)
        self.model.to(self.device)
        self.meta = prediction_metadata(config, self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg_t.lr)
        self.schedule = _renorm_schedule(config)
        assert cfg_t.loss is not None  # filled in by the configuration's validation
        self.loss = loss_function(
            cfg_t.loss, config.model.activation, cfg_t.loss_weights.dice, cfg_t.loss_weights.ce
        )
        self.names = class_names(config)

    # ------------------------------------------------------------------ start
    def restore(self, state: dict[str, Any]) -> int:
        """Continue a checkpoint: weights, optimizer, schedule, sampler, random states."""
        self.model.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])
        if state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"])
        return int(state["step"])

    def initialize(self, init: str | None) -> int:
        """Start from step 0, with another checkpoint's weights if ``init`` names one."""
        if init is None:
            return 0
        state = read_checkpoint(init)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:2])
            raise ShapeMismatchError(
                f"train.init {init!r}: its weights do not fit the network of this "
                f"configuration ({detail[:300]}); convert it first with "
                f"`nahtlos convert {init} OUT.pt --to {self.config.model.norm}` and check "
                "model.channels/strides/ndim"
            ) from exc
        return 0

    def open_logs(self, start: int, resumed: bool) -> None:
        keep = start if resumed else None
        self.log = CsvLog(
            self.out / "log.csv", ["step", "loss", "lr", "seconds", "r_max", "d_max"], keep
        )
        columns = ["step"] + [
            f"{k}_{n}" for k in ("dice_eval", "dice_train", "disparity") for n in self.names
        ]
        self.val_log = CsvLog(self.out / "validation.csv", columns, keep)

    # ------------------------------------------------------------------ steps
    def step(self, step: int) -> float:
        """One optimizer step (``step`` is 0-based); returns the mean loss and logs it."""
        cfg_t = self.config.train
        t0 = time.perf_counter()
        lr = learning_rate(step, cfg_t.steps, cfg_t.lr, cfg_t.lr_schedule, cfg_t.lr_warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        r_max, d_max = (1.0, 0.0)
        if self.schedule is not None:
            # per optimizer step: every micro-batch of this step sees the same values
            self.schedule.apply(self.model, step)
            r_max, d_max = self.schedule.values(step)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg_t.accumulate):
            x, y = self.sampler.batch(cfg_t.batch_size)
            x, y = x.to(self.device), y.to(self.device)
            loss = self.loss(self.model(x), y)
            (loss / cfg_t.accumulate).backward()
            total += float(loss.detach())
        self.optimizer.step()
        mean_loss = total / cfg_t.accumulate
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"the loss is {mean_loss} at step {step + 1}: training diverged; lower "
                f"train.lr (now {cfg_t.lr}) or resume from an earlier checkpoint"
            )
        seconds = f"{time.perf_counter() - t0:.4f}"
        self.log.append(
            {"step": step + 1, "loss": repr(mean_loss), "lr": repr(lr), "seconds": seconds}
            | {"r_max": r_max, "d_max": d_max}
        )
        return mean_loss

    def validate(self) -> dict[str, np.ndarray]:
        """Block-wise validation Dice in eval and train mode (see :func:`validate`)."""
        return validate(
            self.model,
            self.val_vols,
            block=self.meta["block"],  # train.val_block, else the patch
            halo=self.meta["halo"],
            alignment=self.meta["alignment"],
            activation=self.config.model.activation,
            labels=self.config.data.labels,
            num_classes=self.config.data.num_classes,
            boundary_mode=self.config.data.boundary_mode,
            batch_size=self.config.train.val_batch_size,
        )

    def validation_row(self, done: int) -> dict[str, float]:
        """Validate, log the scores and return them as a row."""
        scores = self.validate()
        row: dict[str, float] = {"step": done}
        for key, values in scores.items():
            for n, v in zip(self.names, values, strict=True):
                row[f"{key}_{n}"] = float(v)
        self.val_log.append(row)
        return row

    def scores(self, values: dict[str, Any]) -> dict[str, list[float]]:
        """Validation scores (a row or :meth:`validate`'s arrays) as lists per class."""
        kinds = ("dice_eval", "dice_train", "disparity")
        if "step" in values:
            return {k: [float(values[f"{k}_{n}"]) for n in self.names] for k in kinds}
        return {k: [float(v) for v in values[k]] for k in kinds}

    def checkpoint(self, step: int, path: Path | None = None) -> Path:
        return save_checkpoint(
            path or self.out / "checkpoints" / f"step-{step:06d}.pt",
            config=self.config.model_dump(mode="json"),
            model=self.model,
            prediction=self.meta,
            optimizer=self.optimizer,
            schedule=self.schedule,
            step=step,
            sampler=self.sampler.state_dict(),
        )

    # ------------------------------------------------------------------ end
    def recalibrate(self, before: dict[str, float] | None) -> dict[str, Any] | None:
        """Replace the running statistics by population statistics of the final network
        over ``train.recalibrate`` training patches; record validation before and after."""
        cfg_t = self.config.train
        count = cfg_t.recalibrate
        if count == "auto":
            count = "all" if recalibrates_by_default(self.model) else 0
        if count == 0 or not running_stat_layers(self.model):
            return None
        assert self.config.data.patch is not None
        patches: Sequence[np.ndarray]
        if count == "all":
            patches = volume_tiles(self.train_vols, self.config.data.patch)
        else:
            # its own generator: the patches do not depend on (or move) the training's
            sampler = _sampler(self.config, self.train_vols, cfg_t.seed + 1, False)
            patches = [sampler.sample()[0] for _ in range(count)]
        before_scores = self.scores(self.validate()) if self.val_vols and before is None else None
        batch = cfg_t.batch_size if cfg_t.recalibrate_method == "precise" else cfg_t.val_batch_size
        done = recalibrate_model(self.model, patches, cfg_t.recalibrate_method, batch_size=batch)
        if self.val_vols:
            # a run resumed at its last step has validated nothing yet
            done.before = self.scores(before) if before is not None else before_scores
            done.after = self.scores(self.validate())
        summary = done.to_dict()
        (self.out / "recalibration.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def train(
    config: TrainingConfig,
    *,
    resume: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a network (see the module docstring).

    Parameters
    ----------
    config
        The validated configuration.
    resume
        A checkpoint to continue from (its weights, optimizer, schedule, sampler and
        random states); ``config`` may extend ``train.steps``.
    out_dir
        Output folder (default ``config.out``).
    progress
        Show a progress bar with the loss.

    Returns
    -------
    TrainResult
        Losses of the steps run, validation rows, and the final checkpoint.

    Raises
    ------
    ShapeMismatchError
        If images and labels, patches and volumes, or channels do not fit together, or
        the weights of ``train.init`` do not fit the network.
    """
    t_start = time.perf_counter()
    out = Path(out_dir if out_dir is not None else config.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    state = read_checkpoint(resume) if resume is not None else None
    if state is not None:
        validate_config(upgrade_config(state["config"]), f"in checkpoint {str(resume)!r}")
    (out / "config.yaml").write_text(dump_config(config))
    run = _Run(config, out, progress)
    start = run.restore(state) if state is not None else run.initialize(config.train.init)
    run.open_logs(start, resumed=state is not None)
    result = TrainResult(out, out / "model.pt", start, config.train.steps, class_names=run.names)
    last_ckpt = _loop(run, start, result)
    if last_ckpt is None:  # nothing left to do: the resumed checkpoint is the result
        existing = out / "checkpoints" / f"step-{start:06d}.pt"
        # never overwrite a step file: it holds the moving averages to resume from,
        # while the checkpoint resumed from may be a recalibrated model.pt
        last_ckpt = existing if existing.exists() else run.checkpoint(start)
        plot_curves(out, run.names)
    recalibration = run.recalibrate(result.validation[-1] if result.validation else None)
    if recalibration is None:
        shutil.copyfile(last_ckpt, result.checkpoint)
    else:
        run.meta = {**run.meta, "recalibration": recalibration}
        run.checkpoint(config.train.steps, result.checkpoint)
        result.recalibration = recalibration
    result.seconds = time.perf_counter() - t_start
    return result


def _loop(run: _Run, start: int, result: TrainResult) -> Path | None:
    """Optimizer steps ``start..steps``, validating and checkpointing on the way."""
    cfg_t = run.config.train
    bar = tqdm(
        total=cfg_t.steps, initial=start, desc="train", unit="step", disable=not run.progress
    )
    last_ckpt: Path | None = None
    try:
        for step in range(start, cfg_t.steps):
            mean_loss = run.step(step)
            result.losses.append(mean_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            done = step + 1
            if run.val_vols and (done % cfg_t.val_every == 0 or done == cfg_t.steps):
                row = run.validation_row(done)
                result.validation.append(row)
                fg = "foreground" if "foreground" in run.names else run.names[0]
                bar.write(
                    f"step {done}: validation Dice {fg} eval "
                    f"{row[f'dice_eval_{fg}']:.3f} / train {row[f'dice_train_{fg}']:.3f}"
                )
            if done % cfg_t.checkpoint_every == 0 or done == cfg_t.steps:
                last_ckpt = run.checkpoint(done)
                plot_curves(run.out, run.names)
    finally:
        bar.close()
    return last_ckpt

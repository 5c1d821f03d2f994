"""Training with the paper's recipe, checkpoints, and exact resume.

The recipe (paper, Appendix A): Adam (lr 1e-3), batch size 1 with gradient
accumulation over 8 micro-batches, random patches with random flips, a Dice loss
averaged over the channels that are not empty in the label patch, and for BatchRenorm
the r_max/d_max schedule stepped once per *optimizer* step. Validation predicts the
validation region block-wise (:func:`~nahtlos.engine.predict.predict_blockwise`), in eval mode
and in train mode on the very same windows, and reports Dice per class in both modes
and their train/eval disparity; it leaves the model exactly as it found it.

A run writes into its output folder::

    config.yaml             the resolved configuration
    log.csv                 step, loss, seconds, r_max, d_max per optimizer step
    validation.csv          step, dice_eval_<class>, dice_train_<class>, disparity_<class>
    curves.png              loss and validation Dice against steps
    checkpoints/step-N.pt   checkpoints (see nahtlos.nets.checkpoint for the format)
    model.pt                the final checkpoint: ``nahtlos predict model.pt ...``

Resuming from a checkpoint restores weights, optimizer, schedule, the patch sampler
and every random state, so the resumed run continues exactly as if never interrupted
(bit-identical losses on CPU with the same seed and thread count).
"""

from __future__ import annotations

import csv
import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..engine.predict import predict_blockwise, resolve_device
from ..errors import ShapeMismatchError
from ..io import SEMANTIC_CLASSES
from ..nets.checkpoint import measured_geometry, read_checkpoint, restore_rng_state, save_checkpoint
from ..nets.models import model_alignment, model_from_config, unetr_halo
from ..nets.state import activation_function, measuring_mode, preserved_state
from .config import TrainingConfig, dump_config, validate_config
from .data import PatchSampler, Volume, open_volume, semantic_target, split_volume
from .losses import dice_loss

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


# ---------------------------------------------------------------------------- validation


class _BothModes(torch.nn.Module):
    """Eval-mode and train-mode prediction of the same windows, channels concatenated."""

    def __init__(self, model: torch.nn.Module, activation: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each mode starts from the model as it was: train-mode running-statistics
        # updates (BatchNorm, BatchRenorm) are undone after every batch of windows.
        with measuring_mode(self.model, train=False):
            y_eval = self.activation(self.model(x))
        with measuring_mode(self.model, train=True):
            y_train = self.activation(self.model(x))
        return torch.cat([y_eval, y_train], dim=1)


class _DiceCounts:
    """An output "array" for predict_blockwise that counts overlaps instead of storing.

    Each written block holds ``2C`` channels (eval, then train probabilities); the
    matching label region is converted to one-hot and the intersections and sums of
    the binarized (> 0.5) predictions are accumulated per channel.
    """

    def __init__(self, volume: Volume, channels: int, target: Callable[..., np.ndarray]) -> None:
        self.volume = volume
        self.channels = channels
        self.target = target
        self.shape = (2 * channels, *volume.region_shape)
        self.lock = threading.Lock()
        zeros = lambda: np.zeros(channels, np.int64)  # noqa: E731
        self.gt, self.ev, self.tr = zeros(), zeros(), zeros()
        self.ev_gt, self.tr_gt, self.ev_tr = zeros(), zeros(), zeros()

    def __setitem__(self, key: tuple[slice, ...], value: np.ndarray) -> None:
        spatial = key[1:]
        region = tuple(
            slice(r.start + k.start, r.start + k.stop)
            for r, k in zip(self.volume.region, spatial, strict=True)
        )
        gt = self.target(self.volume, region).astype(bool)
        ev = value[: self.channels] > 0.5
        tr = value[self.channels :] > 0.5
        axes = tuple(range(1, gt.ndim))
        sums = [a.sum(axis=axes) for a in (gt, ev, tr, ev & gt, tr & gt, ev & tr)]
        with self.lock:
            for acc, s in zip(
                (self.gt, self.ev, self.tr, self.ev_gt, self.tr_gt, self.ev_tr), sums, strict=True
            ):
                acc += s


def _dice(inter: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    denom = (a + b).astype(np.float64)
    return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), 1.0)


def validate(
    model: torch.nn.Module,
    volumes: Sequence[Volume],
    *,
    block: Sequence[int],
    halo: Sequence[int],
    alignment: Sequence[int],
    activation: str = "sigmoid",
    labels: str = "instances",
    num_classes: int | None = None,
    boundary_mode: str = "thick",
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Block-wise Dice per class in eval and train mode, and their disparity.

    Each volume's region is predicted block-wise once, every batch of windows in
    eval mode and then in train mode (dropout off). Dice per class is computed over
    the whole region from the binarized (> 0.5) probabilities; a class absent from a
    volume's labels gives NaN there. Over several volumes the median is reported (as
    in the paper). The disparity is ``1 - Dice(train, eval)`` per class. The model's
    buffers and modes are restored afterwards.

    Returns
    -------
    dict
        ``dice_eval``, ``dice_train``, ``disparity``: arrays of one value per class.
    """
    act = activation_function(activation)
    assert act is not None

    def target(vol: Volume, region: tuple[slice, ...]) -> np.ndarray:
        return semantic_target(vol, region, labels, num_classes, boundary_mode)  # type: ignore[arg-type]

    results: dict[str, list[np.ndarray]] = {"dice_eval": [], "dice_train": [], "disparity": []}
    with preserved_state(model):  # restores the train/eval flags, too
        both = _BothModes(model, act)
        for vol in volumes:
            probe = target(vol, tuple(slice(r.start, r.start + 1) for r in vol.region))
            counts = _DiceCounts(vol, probe.shape[0], target)
            predict_blockwise(
                both,
                vol.image_region(),
                block,
                halo,
                alignment,
                ndim=vol.ndim,
                batch_size=batch_size,
                out=counts,
                input_transform=vol.normalization,
                progress=progress,
            )
            present = counts.gt > 0
            results["dice_eval"].append(
                np.where(present, _dice(counts.ev_gt, counts.ev, counts.gt), np.nan)
            )
            results["dice_train"].append(
                np.where(present, _dice(counts.tr_gt, counts.tr, counts.gt), np.nan)
            )
            results["disparity"].append(1.0 - _dice(counts.ev_tr, counts.ev, counts.tr))
    out = {}
    for key, values in results.items():
        stack = np.stack(values)  # (volumes, classes)
        out[key] = np.array(
            [
                np.median(col[~np.isnan(col)]) if (~np.isnan(col)).any() else np.nan
                for col in stack.T
            ]
        )
    return out


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


def _renorm_schedule(config: TrainingConfig) -> Any:
    if config.model.norm != "batchrenorm":
        return None
    from ..nets.norms import RenormSchedule

    warm, ramp = config.train.warmup_and_ramp()
    r = config.train.renorm
    return RenormSchedule(warm, ramp, r_max=r.r_max, d_max=r.d_max)


class _Csv:
    """A CSV log that, on resume, keeps only the rows up to the checkpoint's step."""

    def __init__(self, path: Path, columns: Sequence[str], keep_until: int | None) -> None:
        self.path = path
        self.columns = list(columns)
        rows: list[dict[str, str]] = []
        if keep_until is not None and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= keep_until]
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(row)


def _plot_curves(out: Path, names: Sequence[str]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log, val = out / "log.csv", out / "validation.csv"
    if not log.exists():
        return None
    with log.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, loss, color="0.75", lw=0.8, label="loss")
    width = max(1, len(loss) // 50)
    if width > 1:
        smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
        ax1.plot(steps[width - 1 :], smooth, color="C0", label=f"mean of {width}")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("Dice loss")
    ax1.set_title("training loss")
    ax1.legend()
    if val.exists():
        with val.open(newline="") as f:
            vrows = list(csv.DictReader(f))
        if vrows:
            vsteps = [int(r["step"]) for r in vrows]
            for i, name in enumerate(names):
                for mode, style in (("eval", "-"), ("train", "--")):
                    ys = [float(r[f"dice_{mode}_{name}"] or "nan") for r in vrows]
                    ax2.plot(vsteps, ys, style, color=f"C{i}", marker=".", label=f"{name} ({mode})")
            ax2.set_ylim(0, 1)
            ax2.legend(fontsize="small")
    r_max = np.array([float(r["r_max"]) for r in rows])
    if (r_max > 1).any():  # BatchRenorm: mark where the warm-up ends and the ramp ends
        start = steps[np.argmax(r_max > 1)] - 1
        end = steps[np.argmax(r_max >= r_max.max())]
        for ax in (ax1, ax2):
            ax.axvspan(start, end, color="0.9", zorder=0, label="r_max/d_max ramp")
        ax1.legend()
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("validation Dice")
    ax2.set_title("validation (block-wise; solid eval, dashed train mode)")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def train(
    config: TrainingConfig,
    *,
    resume: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a network with the paper's recipe (see the module docstring).

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
        If images and labels, patches and volumes, or channels do not fit together.
    """
    t_start = time.perf_counter()
    out = Path(out_dir if out_dir is not None else config.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    state = read_checkpoint(resume) if resume is not None else None
    if state is not None:
        validate_config(state["config"], f"in checkpoint {str(resume)!r}")
    (out / "config.yaml").write_text(dump_config(config))

    cfg_t = config.train
    device = resolve_device(cfg_t.device)
    _seed_everything(cfg_t.seed)
    train_vols, val_vols = _volumes(config, progress)
    assert config.data.patch is not None
    sampler = PatchSampler(
        train_vols,
        config.data.patch,
        labels=config.data.labels,
        num_classes=config.data.num_classes,
        boundary_mode=config.data.boundary_mode,
        foreground_bias=config.data.foreground_bias,
        flips=config.data.flips,
        seed=cfg_t.seed,
    )
    model = model_from_config(config.model, config.out_channels, config.data.patch)
    model.to(device)
    meta = prediction_metadata(config, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg_t.lr)
    schedule = _renorm_schedule(config)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        if schedule is not None and state.get("schedule") is not None:
            schedule.load_state_dict(state["schedule"])
        if state.get("sampler") is not None:
            sampler.load_state_dict(state["sampler"])
        restore_rng_state(state["rng"])
        start = int(state["step"])

    names = class_names(config)
    log = _Csv(
        out / "log.csv",
        ["step", "loss", "seconds", "r_max", "d_max"],
        start if state is not None else None,
    )
    val_columns = ["step"] + [
        f"{k}_{n}" for k in ("dice_eval", "dice_train", "disparity") for n in names
    ]
    val_log = _Csv(out / "validation.csv", val_columns, start if state is not None else None)
    block = meta["block"]  # train.val_block, else the patch (prediction_metadata)
    result = TrainResult(out, out / "model.pt", start, cfg_t.steps)

    def checkpoint(step: int) -> Path:
        return save_checkpoint(
            out / "checkpoints" / f"step-{step:06d}.pt",
            config=config.model_dump(mode="json"),
            model=model,
            prediction=meta,
            optimizer=optimizer,
            schedule=schedule,
            step=step,
            sampler=sampler.state_dict(),
        )

    bar = tqdm(total=cfg_t.steps, initial=start, desc="train", unit="step", disable=not progress)
    last_ckpt: Path | None = None
    try:
        for step in range(start, cfg_t.steps):
            t0 = time.perf_counter()
            r_max, d_max = (1.0, 0.0)
            if schedule is not None:
                # per optimizer step: every micro-batch of this step sees the same values
                schedule.apply(model, step)
                r_max, d_max = schedule.values(step)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(cfg_t.accumulate):
                x, y = sampler.batch(cfg_t.batch_size)
                x, y = x.to(device), y.to(device)
                loss = dice_loss(model(x), y, config.model.activation)
                (loss / cfg_t.accumulate).backward()
                total += float(loss.detach())
            optimizer.step()
            done = step + 1
            mean_loss = total / cfg_t.accumulate
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"the loss is {mean_loss} at step {done}: training diverged; lower train.lr "
                    f"(now {cfg_t.lr}) or resume from an earlier checkpoint"
                )
            result.losses.append(mean_loss)
            log.append(
                {
                    "step": done,
                    "loss": repr(mean_loss),
                    "seconds": f"{time.perf_counter() - t0:.4f}",
                    "r_max": r_max,
                    "d_max": d_max,
                }
            )
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if val_vols and (done % cfg_t.val_every == 0 or done == cfg_t.steps):
                scores = validate(
                    model,
                    val_vols,
                    block=block,
                    halo=meta["halo"],
                    alignment=meta["alignment"],
                    activation=config.model.activation,
                    labels=config.data.labels,
                    num_classes=config.data.num_classes,
                    boundary_mode=config.data.boundary_mode,
                    batch_size=cfg_t.val_batch_size,
                )
                row: dict[str, float] = {"step": done}
                for key, values in scores.items():
                    for n, v in zip(names, values, strict=True):
                        row[f"{key}_{n}"] = float(v)
                result.validation.append(row)
                val_log.append(row)
                fg = names.index("foreground") if "foreground" in names else 0
                bar.write(
                    f"step {done}: validation Dice {names[fg]} eval "
                    f"{scores['dice_eval'][fg]:.3f} / train {scores['dice_train'][fg]:.3f}"
                )
            if done % cfg_t.checkpoint_every == 0 or done == cfg_t.steps:
                last_ckpt = checkpoint(done)
                _plot_curves(out, names)
    finally:
        bar.close()
    if last_ckpt is None:  # nothing left to do: the resumed checkpoint is the result
        last_ckpt = checkpoint(start)
        _plot_curves(out, names)
    shutil.copyfile(last_ckpt, result.checkpoint)
    result.seconds = time.perf_counter() - t_start
    return result

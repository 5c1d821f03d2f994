"""``nahtlos train``: train a network with the paper's recipe, or resume a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import cli_errors, fail, parse_ints


def register(app: typer.Typer) -> None:
    app.command("train")(train)


@cli_errors
def train(
    config: Annotated[
        Path | None,
        typer.Argument(help="YAML configuration (see docs/training.md); optional with --image."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Override a field: --set train.steps=500 (repeatable; YAML values)."
        ),
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="Short form: the image (.tif, .zarr, file.h5:key, .npy).")
    ] = None,
    labels: Annotated[
        str | None, typer.Option(help="Short form: its instance labels (same spatial shape).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder of the run.")] = None,
    dims: Annotated[
        int | None, typer.Option(min=2, max=3, help="Spatial dimensions (default: the image's).")
    ] = None,
    norm: Annotated[
        str | None,
        typer.Option(
            help="Feature norm: batch, instance, instance_running, batchrenorm, group, identity."
        ),
    ] = None,
    arch: Annotated[str | None, typer.Option(help="unet or unetr.")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Optimizer steps.")] = None,
    patch: Annotated[str | None, typer.Option(help="Training patch: Y,X or Z,Y,X.")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue from a checkpoint (its configuration, unless CONFIG is given)."
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            help="Start from this checkpoint's weights with a fresh optimizer and schedules "
            "(e.g. an InstanceNorm model after `nahtlos convert --to batchrenorm`)."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a seamless segmentation network; write checkpoints, logs and curves to --out.

    With CONFIG, the YAML file describes the run and --set overrides fields. Without it,
    --image and --labels describe a single annotated image whose last 30% (along the
    first spatial axis) validates.
    """
    from ..nets.checkpoint import read_checkpoint
    from ..training.config import load_config, validate_config
    from ..training.loop import train as run_training

    overrides = list(set_ or [])
    short: dict[str, Any] = {}
    if dims is not None:
        short["model.ndim"] = dims
    if norm is not None:
        short["model.norm"] = norm
    if arch is not None:
        short["model.arch"] = arch
    if steps is not None:
        short["train.steps"] = steps
    if patch is not None:
        short["data.patch"] = list(_as_tuple(parse_ints(patch, "patch")))
    if out is not None:
        short["out"] = str(out)
    if init is not None:
        if resume is not None:
            raise fail("give either --resume (continue a run) or --init (start from weights)")
        short["train.init"] = str(init)
    if image is not None or labels is not None:
        if config is not None:
            raise fail("give either CONFIG or --image/--labels, not both")
        if image is None or labels is None:
            raise fail("the short form needs both --image and --labels")
    overrides += [f"{k}={_yaml(v)}" for k, v in short.items()]

    if config is not None:
        cfg = load_config(config, overrides)
    elif image is not None and labels is not None:
        cfg = load_config(None, overrides, base=_short_form_base(image, labels, dims))
    elif resume is not None:
        state = read_checkpoint(resume)
        from ..training.config import apply_overrides, upgrade_config

        raw = upgrade_config(state["config"])
        cfg = validate_config(apply_overrides(raw, overrides), f"of checkpoint {str(resume)!r}")
    else:
        raise fail("give a CONFIG file, --image and --labels, or --resume CHECKPOINT")
    result = run_training(cfg, resume=resume, progress=progress)
    typer.echo(
        f"trained {result.steps} steps in {result.seconds:.0f} s; model: {result.checkpoint}"
    )
    if result.validation:
        last = result.validation[-1]
        dice = ", ".join(
            f"{k.removeprefix('dice_eval_')} {v:.3f}"
            for k, v in last.items()
            if k.startswith("dice_eval_")
        )
        typer.echo(f"validation Dice (eval mode, step {int(last['step'])}): {dice}")
    after = (result.recalibration or {}).get("after")
    if after is not None:
        dice = ", ".join(
            f"{n} {v:.3f}" for n, v in zip(result.class_names, after["dice_eval"], strict=True)
        )
        typer.echo(f"after recalibrating the norms' statistics: {dice}")


def _as_tuple(value: int | tuple[int, ...] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return value if isinstance(value, tuple) else (value,)


def _yaml(value: Any) -> str:
    import yaml

    text: str = yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("\n...").strip()


def _short_form_base(image: str, labels: str, dims: int | None) -> dict[str, Any]:
    from ..io import open_image

    shape = tuple(open_image(image).shape)
    nd = dims if dims is not None else (len(shape) if len(shape) in (2, 3) else 3)
    model: dict[str, Any] = {"ndim": nd}
    if len(shape) == nd + 1:
        model["in_channels"] = int(shape[0])
    return {
        "data": {
            "train": [{"image": image, "labels": labels}],
            "split": {"volume": 0, "fraction": 0.3, "axis": 0},
        },
        "model": model,
    }

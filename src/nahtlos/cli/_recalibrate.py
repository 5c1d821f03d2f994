"""``nahtlos recalibrate``: population statistics of a trained network's norm layers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import cli_errors, fail


def register(app: typer.Typer) -> None:
    app.command("recalibrate")(recalibrate)


@cli_errors
def recalibrate(
    model: Annotated[Path, typer.Argument(help="A nahtlos checkpoint (BatchNorm or BatchRenorm).")],
    out: Annotated[Path, typer.Argument(help="Where to write the recalibrated checkpoint.")],
    image: Annotated[
        list[str],
        typer.Option(help="Training image(s) to draw patches from (repeatable; .tif, .zarr, ...)."),
    ],
    labels: Annotated[
        list[str] | None,
        typer.Option(
            help="Labels of each --image (optional): report Dice and train/eval disparity "
            "before and after."
        ),
    ] = None,
    patches: Annotated[
        str,
        typer.Option(
            help="'all': tiles of the training patch size covering the images; or a number "
            "of random patches."
        ),
    ] = "all",
    method: Annotated[
        str,
        typer.Option(
            help="pooled (all voxels as one population), layerwise (per-patch statistics "
            "averaged) or precise (train-mode batch statistics); each layer in eval mode "
            "after the ones before it, except precise."
        ),
    ] = "pooled",
    seed: Annotated[int, typer.Option(help="Seed of the patch positions.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Replace the running statistics of MODEL's BatchNorm/BatchRenorm layers by exact
    statistics of the final network over training patches, and write OUT.

    Moving averages taken while the weights changed lag behind the trained network;
    recalibrated statistics match it (docs/training.md).
    """
    from ..training.recalibrate import recalibrate_checkpoint

    if patches != "all" and not (patches.isdigit() and int(patches) > 0):
        raise fail(f"--patches {patches!r} is not a positive number of patches or 'all'")
    count: int | str = patches if patches == "all" else int(patches)
    done = recalibrate_checkpoint(
        model,
        out,
        image,
        patches=count,
        method=method,
        labels=labels or (),
        seed=seed,
        overwrite=overwrite,
        progress=progress,
    )
    summary = done.to_dict()
    typer.echo(
        f"recalibrated {summary['layers']} layers ({done.method}, {done.patches} patches); "
        f"largest shift of a running mean: {summary['largest_mean_shift']:.3g} σ; wrote {out}"
    )
    if done.before is not None and done.after is not None:
        for key, label in (
            ("dice_eval", "Dice (eval mode)"),
            ("disparity", "train/eval disparity"),
        ):
            pairs = ", ".join(
                f"{b:.3f} -> {a:.3f}"
                for b, a in zip(done.before[key], done.after[key], strict=True)
            )
            typer.echo(f"{label} per class, before -> after: {pairs}")

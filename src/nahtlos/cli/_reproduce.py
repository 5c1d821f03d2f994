"""``nahtlos reproduce``: run the paper's normalization grid and write its tables and figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ._common import cli_errors, fail, parse_ints


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)


def _names(text: str | None, option: str, known: tuple[str, ...]) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    for n in names:
        if n not in known:
            raise fail(f"--{option} {n!r} is not one of {', '.join(known)}")
    return names


@cli_errors
def reproduce(
    preset: Annotated[
        str,
        typer.Option(
            help="quick: 2D, small networks, the whole grid on a laptop CPU; "
            "paper: the paper's 3D sizes (96³ patches, 25 000 steps x 8), for GPUs."
        ),
    ] = "quick",
    out: Annotated[
        Path, typer.Option(help="Output folder; an earlier run of the same preset resumes.")
    ] = Path("nahtlos-reproduce"),
    archs: Annotated[
        str, typer.Option(help="unet (Table 1), unetr (Table 2), or both, comma-separated.")
    ] = "unet,unetr",
    datasets: Annotated[
        str | None,
        typer.Option(help="Subset of organoids,plants,embryo (default: all)."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, help="Cells trained in parallel processes (default: the preset's)."),
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(
            help="Training seeds, e.g. 0,1,2: one run per seed in OUT/seed-N on the same "
            "data, and their means in OUT/seeds.md."
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Start over in a folder that holds a run of another preset.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Reproduce the paper's experiments on synthetic data: Tables 1 and 2, transfer,
    the tile-size sweep and stitched predictions, and whole-image statistics for the
    InstanceNorm U-Nets.

    Every cell (architecture x dataset x norm) is trained and evaluated once; a re-run
    skips finished cells and resumes an interrupted training from its checkpoint. The
    tables (tables.md, results.csv) and figures are rebuilt from all finished cells.
    """
    from ..paper.experiments import PRESETS
    from ..paper.experiments import reproduce as run
    from ..paper.synth import SYNTHETIC_DATASETS

    if preset not in PRESETS:
        raise fail(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    arch_names = _names(archs, "archs", ("unet", "unetr")) or ("unet", "unetr")
    dataset_names = _names(datasets, "datasets", SYNTHETIC_DATASETS)

    def report(cell: object, res: dict) -> None:
        ev = res["evaluations"][res["cell"]["dataset"]]
        dice = ", ".join(
            f"{k} {v:.2f}"
            for k, v in ev["dice_eval"].items()
            if v is not None and k != "background"
        )
        mm = "no" if ev["mismatch"]["seamless"] else f"{ev['mismatch']['indicator']:.2g}"
        trained = (
            f"the network of {res['weights_from']}"
            if res.get("weights_from")
            else f"train {res['train_seconds']:.0f} s"
        )
        typer.echo(
            f"{getattr(cell, 'key', cell)}: eval Dice {dice}; tile mismatch {mm} "
            f"({trained}, eval {res['eval_seconds']:.0f} s)"
        )

    options: dict[str, Any] = {
        "archs": arch_names,
        "datasets": dataset_names,
        "workers": workers,
        "overwrite": overwrite,
        "progress": progress,
        "on_cell_done": report,
    }
    if seeds is not None:
        from ..paper.experiments import reproduce_seeds

        numbers = parse_ints(seeds, "seeds")
        chosen = numbers if isinstance(numbers, tuple) else (numbers,)
        results = reproduce_seeds(preset, out, [int(s) for s in chosen if s is not None], **options)
    else:
        results = [run(preset, out, **options)]
    for result in results:
        typer.echo(
            f"{result.out}: {len(result.ran)} cells run, {len(result.skipped)} already done, "
            f"{result.seconds:.0f} s. Wrote:"
        )
        for path in result.files.values():
            typer.echo(f"  {path}")
    if seeds is not None:
        typer.echo(f"seed means: {out / 'seeds.md'}")

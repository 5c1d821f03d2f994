"""``nahtlos demo``: the main job on built-in data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import cli_errors


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@cli_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's outputs.")] = Path("demo-output"),
    seed: Annotated[int, typer.Option(help="Random seed of the synthetic data.")] = 0,
) -> None:
    """Predict a synthetic 3D volume block-wise with BatchNorm and InstanceNorm networks."""
    from .._demo import run_demo

    run_demo(out, seed=seed)

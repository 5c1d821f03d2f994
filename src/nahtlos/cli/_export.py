"""``nahtlos export``: a prediction-only copy of a training checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import cli_errors


def register(app: typer.Typer) -> None:
    app.command("export")(export)


@cli_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint written by nahtlos train.")],
    out: Annotated[Path, typer.Argument(help="Where to write the prediction-only checkpoint.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
) -> None:
    """Copy CHECKPOINT without its optimizer state (about a third of the size).

    The copy predicts, diagnoses and converts like the original, and fine-tunes with
    `nahtlos train --resume OUT` (with a fresh optimizer).
    """
    from ..nets.checkpoint import export_checkpoint

    written = export_checkpoint(checkpoint, out, overwrite=overwrite)
    size = written.stat().st_size
    typer.echo(
        f"wrote {written} ({size / 1024:.0f} KiB, from {checkpoint.stat().st_size / 1024:.0f} KiB)"
    )

"""``nahtlos convert``: swap the normalization layers of a model file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..nets.checkpoint import convert_model_file
from ..nets.norms import NORM_NAMES
from ._common import cli_errors, fail


def register(app: typer.Typer) -> None:
    app.command("convert")(convert)


@cli_errors
def convert(
    model: Annotated[Path, typer.Argument(help="Model file to convert.")],
    out: Annotated[Path, typer.Argument(help="Where to write the converted model.")],
    to: Annotated[str, typer.Option(help=f"Target norm: {', '.join(NORM_NAMES)}.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT.")] = False,
) -> None:
    """Convert every BatchNorm/InstanceNorm/GroupNorm/BatchRenorm layer of MODEL to --to.

    Affine parameters and running statistics are kept; BatchNorm <-> BatchRenorm keeps eval-mode predictions identical. TorchScript files cannot be converted (their graph is compiled); the error says how to convert the Python model instead.
    """
    if to not in NORM_NAMES:
        raise fail(f"--to {to!r} is not a norm; choose one of {', '.join(NORM_NAMES)}")
    written = convert_model_file(model, out, to, overwrite=overwrite)
    typer.echo(f"wrote {written}")

"""The ``nahtlos`` command line: one command, a sub-command per job.

Each sub-command lives in its own private module and is a thin shell over library
functions; errors from nahtlos become a one-line message and exit code 2.
"""

from __future__ import annotations

import typer

from . import (
    _convert,
    _demo,
    _diagnose,
    _export,
    _predict,
    _recalibrate,
    _reproduce,
    _rf,
    _synth,
    _train,
)

__all__ = ["app", "main"]

app = typer.Typer(
    name="nahtlos",
    help="Seamless tile-and-stitch segmentation of very large 2D/3D microscopy images.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in (
    _predict,
    _rf,
    _diagnose,
    _convert,
    _export,
    _synth,
    _demo,
    _train,
    _recalibrate,
    _reproduce,
):
    _module.register(app)


def main() -> None:
    """Entry point of the ``nahtlos`` script."""
    app()

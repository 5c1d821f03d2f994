"""``nahtlos rf``: receptive field, alignment, tile dependence and the halo of a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..nets.checkpoint import load_model
from ._common import cli_errors, fail, parse_ints


def register(app: typer.Typer) -> None:
    app.command("rf")(rf)


@cli_errors
def rf(
    model: Annotated[
        Path, typer.Argument(help="A nahtlos checkpoint or a TorchScript file (torch.jit.save).")
    ],
    dims: Annotated[
        int | None,
        typer.Option(min=2, max=3, help="Spatial dimensions (default: the model's metadata)."),
    ] = None,
    in_channels: Annotated[
        int | None, typer.Option(min=1, help="Input channels (default: metadata, else 1).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of a table.")
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write the ERF gradient map with TRF box and ERF contours (.png)."),
    ] = None,
    mass: Annotated[
        float, typer.Option(min=0.5, max=1.0, help="ERF mass for the halo of inexact models.")
    ] = 0.99,
    shape: Annotated[
        str | None,
        typer.Option(help="Probe input shape, for models that take one size only (e.g. 96,96,96)."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N.")] = "cpu",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Print the receptive field (TRF, ERF), alignment, tile dependence and halo of MODEL."""
    from ..nets.receptive_field import plot_receptive_field, receptive_field

    loaded = load_model(model, map_location=device)
    ndim = dims if dims is not None else loaded.metadata.get("ndim")
    if ndim is None:
        raise fail(f"--dims is required: model {str(model)!r} does not record its dimensions")
    channels = in_channels if in_channels is not None else loaded.metadata.get("in_channels", 1)
    probe_shape = parse_ints(shape, "shape")
    result = receptive_field(
        loaded, int(ndim), int(channels), shape=probe_shape, device=device, progress=progress
    )
    if plot is not None:
        plot_receptive_field(result, plot, mass=mass)
    if as_json:
        typer.echo(json.dumps(result.to_dict(mass)))
    else:
        typer.echo(result.summary(mass))
        if plot is not None:
            typer.echo(f"wrote {plot}")
    if not result.exact:
        typer.echo(
            f"nahtlos: warning: exact stitching is impossible for this model: {result.reason()}",
            err=True,
        )

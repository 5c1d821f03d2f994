"""``nahtlos demo``: a large synthetic volume predicted out of core, seams diagnosed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import cli_errors, fail, parse_ints


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)


@cli_errors
def demo(
    out: Annotated[
        Path, typer.Option(help="Folder for the demo's outputs (its own files are replaced).")
    ] = Path("demo-output"),
    shape: Annotated[
        str, typer.Option(help="Synthetic volume Z,Y,X (default 128,512,1024: 64 Mi voxels).")
    ] = "128,512,1024",
    block: Annotated[
        str, typer.Option(help="Inner block Z,Y,X of the out-of-core predictions.")
    ] = "64,128,256",
    region: Annotated[str, typer.Option(help="Size Z,Y,X of the central region diagnosed.")] = (
        "64,256,256"
    ),
    seed: Annotated[int, typer.Option(min=0, help="Seed of the synthetic volume.")] = 0,
    global_stats: Annotated[
        bool,
        typer.Option(
            help="Also predict with the InstanceNorm network frozen to whole-volume statistics."
        ),
    ] = True,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Write a large synthetic 3D volume as OME-Zarr and predict it out of core.

    Two shipped networks, the same small U-Net trained with InstanceNorm and with
    BatchRenorm, predict it block-wise into OME-Zarr images; diagnose reports show the
    InstanceNorm network's seams and their absence for BatchRenorm. The end of the output
    says where to look.
    """
    from ..paper.demo import run_demo

    sizes = {}
    for name, text in (("shape", shape), ("block", block), ("region", region)):
        value = parse_ints(text, name)
        if not isinstance(value, tuple) or len(value) != 3:
            raise fail(f"--{name} {text!r}: give three sizes Z,Y,X")
        sizes[name] = value
    run_demo(
        out,
        shape=sizes["shape"],
        block=sizes["block"],
        region=sizes["region"],
        seed=seed,
        global_stats=global_stats,
        progress=progress,
        log=typer.echo,
    )

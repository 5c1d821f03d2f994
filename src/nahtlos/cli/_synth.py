"""``nahtlos synth``: write a synthetic dataset (image + labels) as OME-Zarr or TIFF."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import cli_errors, fail, parse_ints


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)


@cli_errors
def synth(
    name: Annotated[str, typer.Argument(help="Dataset: organoids, plants or embryo.")],
    out: Annotated[
        Path,
        typer.Argument(help="Output: NAME.zarr (OME-Zarr) or NAME.tif (TIFF files)."),
    ],
    shape: Annotated[
        str, typer.Option(help="Z,Y,X for a 3D volume or Y,X for a 2D image.")
    ] = "128,256,256",
    seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same data).")] = 0,
    anisotropy: Annotated[
        float, typer.Option(help="Z step in units of the XY pixel size (3D only).")
    ] = 1.0,
    format: Annotated[
        str | None,
        typer.Option("--format", help="ome-zarr or tif (default: from the suffix of OUT)."),
    ] = None,
    chunks: Annotated[
        str | None, typer.Option(help="OME-Zarr chunk shape, e.g. 64,128,128.")
    ] = None,
    preview: Annotated[
        Path | None,
        typer.Option(help="Also save a PNG of image, labels and classes (middle slice)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Generate synthetic microscopy data with ground truth, block by block to disk.

    organoids: FIB/SEM-like cells (membranes = boundaries) and large regions of
    extracellular matrix; plants: dense, homogeneous nuclei; embryo: sparse nuclei
    with strongly varying brightness. The same NAME, shape, seed and anisotropy always
    give the same arrays.
    """
    from ..paper.synth import open_synthetic, save_preview, write_synthetic

    shape_v = parse_ints(shape, "shape")
    if not isinstance(shape_v, tuple):
        raise fail(f"--shape {shape!r} needs 2 (Y,X) or 3 (Z,Y,X) values")
    chunks_v = parse_ints(chunks, "chunks")
    if isinstance(chunks_v, int):
        chunks_v = (chunks_v,) * len(shape_v)
    if preview is not None and preview.suffix.lower() != ".png":
        raise fail(f"--preview {str(preview)!r} must end in .png")
    written = write_synthetic(
        name,
        out,
        shape_v,
        seed=seed,
        anisotropy=anisotropy,
        format=format,
        chunks=chunks_v,
        overwrite=overwrite,
        progress=progress,
    )
    levels = f", {written.levels} resolution levels" if written.levels > 1 else ""
    typer.echo(
        f"wrote synthetic {name!r} (seed {seed}, anisotropy {anisotropy:g}) as "
        f"{written.format}{levels}:"
    )
    typer.echo(written.describe())
    if preview is not None:
        picture = save_preview([open_synthetic(written.paths["image"])], preview)
        typer.echo(f"  {picture}  (preview)")

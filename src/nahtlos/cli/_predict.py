"""``nahtlos predict``: block-wise prediction of an image file into an output file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..autoblock import auto_geometry, parse_memory
from ..checkpoint import load_model
from ..errors import BlockShapeError
from ..geometry import BlockGrid
from ..io import PendingOutput, check_output_path, open_image
from ..predict import predict_blockwise, resolve_device
from ._common import cli_errors, fail, parse_ints


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


@cli_errors
def predict(
    model: Annotated[Path, typer.Argument(help="TorchScript file (torch.jit.save).")],
    input: Annotated[
        str, typer.Argument(help="Image: .tif/.tiff, .npy, .zarr, or file.h5:dataset.")
    ],
    output: Annotated[
        Path, typer.Argument(help="Output: .zarr, .npy or .tif (float32, C,[Z,]Y,X).")
    ],
    block: Annotated[
        str | None,
        typer.Option(
            help="Inner block shape per axis, e.g. 64,128,128 (or one value); "
            "auto or left out: the largest that fits --max-memory."
        ),
    ] = None,
    halo: Annotated[
        str | None,
        typer.Option(help="Halo: N or Z,Y,X; auto or left out: from the receptive field."),
    ] = None,
    alignment: Annotated[
        str | None,
        typer.Option(help="Network down-sampling factor: N or Z,Y,X; auto or left out: measured."),
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            help="Memory budget for an automatic --block, e.g. 8G or 512MiB "
            "(default: half the free RAM, or free GPU memory)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    input_key: Annotated[
        str | None, typer.Option(help="Dataset inside an HDF5 file or zarr group.")
    ] = None,
    ndim: Annotated[
        int | None,
        typer.Option(min=2, max=3, help="Spatial dimensions (default: from --block or the model)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Predict INPUT block-wise with MODEL and write the raw model output to OUTPUT."""
    out_path = check_output_path(output, overwrite)
    image = open_image(input, input_key)
    loaded = load_model(model, map_location="cpu")
    meta = loaded.metadata
    block_v = parse_ints(block, "block")
    halo_v = parse_ints(halo, "halo")
    align_v = parse_ints(alignment, "alignment")
    if halo_v is None:
        halo_v = meta.get("halo")
    if align_v is None:
        align_v = meta.get("alignment")
    if ndim is None:
        ndim = len(block_v) if isinstance(block_v, tuple) else meta.get("ndim")
    if ndim is None:
        ndim = len(image.shape) if len(image.shape) <= 3 else len(image.shape) - 1
    if len(image.shape) not in (ndim, ndim + 1):
        raise BlockShapeError(
            f"image {input!r} has shape {tuple(image.shape)}, which does not fit a {ndim}D block; "
            f"expected {ndim} spatial axes with an optional leading channel axis"
        )
    auto = False
    if block_v is None or halo_v is None or align_v is None:
        # Left out or "auto": measured from the model (receptive field, memory).
        auto = True
        try:
            budget = None if max_memory is None else parse_memory(max_memory)
        except ValueError as exc:
            raise fail(f"--max-memory: {exc}") from None
        in_channels = int(image.shape[0]) if len(image.shape) == ndim + 1 else 1
        geometry = auto_geometry(
            loaded.module.to(resolve_device(device)),
            ndim,
            in_channels,
            tuple(image.shape[-ndim:]),
            block=block_v,
            halo=halo_v,
            alignment=align_v,
            max_memory=budget,
            batch_size=batch_size,
            progress=progress,
        )
        typer.echo(geometry.describe(), err=True)
        block_v, halo_v, align_v = geometry.block, geometry.halo, geometry.alignment
    # Output chunks equal the blocks, so that no two blocks write the same chunk.
    grid = BlockGrid(tuple(image.shape[-ndim:]), block_v, halo_v, align_v, auto=auto)
    pending = PendingOutput(out_path, chunks=grid.block, overwrite=overwrite)
    dev = resolve_device(device)
    try:
        predict_blockwise(
            loaded.module,
            image,
            grid.block,
            grid.halo,
            grid.alignment,
            ndim=ndim,
            batch_size=batch_size,
            device=dev,
            out=pending,
            progress=progress,
            auto=auto,
        )
        final = pending.commit()
    except BaseException:
        pending.discard()
        raise
    typer.echo(f"wrote {final}")

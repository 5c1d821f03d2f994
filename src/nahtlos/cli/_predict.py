"""``nahtlos predict``: block-wise prediction of an image file into an output file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..checkpoint import load_model
from ..distributed import ACTIVATIONS, predict_file
from ..intensity import InputNormalization
from ..io import OUTPUT_DTYPES, check_output_path, open_source
from ._common import cli_errors, fail, parse_ints


def register(app: typer.Typer) -> None:
    app.command("predict")(predict)


@cli_errors
def predict(
    model: Annotated[Path, typer.Argument(help="TorchScript file (torch.jit.save).")],
    input: Annotated[
        str,
        typer.Argument(
            help="Image: .tif/.tiff, .npy, .zarr (OME-Zarr 0.4/0.5), or file.h5:dataset."
        ),
    ],
    output: Annotated[
        Path,
        typer.Argument(
            help="Output: .zarr (OME-Zarr 0.5, resumable) or .npy/.tif ((C,[Z,]Y,X) arrays)."
        ),
    ],
    block: Annotated[
        str | None, typer.Option(help="Inner block shape per axis, e.g. 64,128,128 (or one value).")
    ] = None,
    halo: Annotated[str | None, typer.Option(help="Halo: N or Z,Y,X.")] = None,
    alignment: Annotated[
        str | None, typer.Option(help="Network down-sampling factor: N or Z,Y,X.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Windows per forward pass.")] = 1,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    input_key: Annotated[
        str | None, typer.Option(help="Dataset inside an HDF5 file or zarr group.")
    ] = None,
    level: Annotated[
        int, typer.Option(min=0, help="Resolution level of an OME-Zarr input (0 = full).")
    ] = 0,
    ndim: Annotated[
        int | None,
        typer.Option(min=2, max=3, help="Spatial dimensions (default: from --block or the model)."),
    ] = None,
    activation: Annotated[
        str,
        typer.Option(help="none, sigmoid or softmax on the output; auto: the model's metadata."),
    ] = "auto",
    output_dtype: Annotated[
        str, typer.Option(help="float32, float16 or uint8 (probabilities x 255).")
    ] = "float32",
    segmentation: Annotated[
        str,
        typer.Option(help="Add labels/ to a .zarr output: none, threshold (per channel), argmax."),
    ] = "none",
    threshold: Annotated[float, typer.Option(help="Threshold of --segmentation threshold.")] = 0.5,
    pyramid_levels: Annotated[
        int | None,
        typer.Option(min=0, help="Extra resolution levels of a .zarr output (default: auto)."),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Run on Dask: 'local' (a LocalCluster) or a scheduler address tcp://host:port."
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Worker processes of --scheduler local.")
    ] = None,
    max_windows: Annotated[
        int | None, typer.Option(min=1, help="At most this many windows in flight (memory bound).")
    ] = None,
    retries: Annotated[
        int, typer.Option(min=0, help="Retries of a failed Dask task before the run stops.")
    ] = 2,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted .zarr output, skipping finished blocks.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Predict INPUT block-wise with MODEL and write the model output to OUTPUT."""
    if resume and overwrite:
        raise fail("--resume continues an output and --overwrite replaces it: choose one")
    for name, value, allowed in (
        ("activation", activation, ("auto", *ACTIVATIONS)),
        ("output-dtype", output_dtype, OUTPUT_DTYPES),
        ("segmentation", segmentation, ("none", "threshold", "argmax")),
    ):
        if value not in allowed:
            raise fail(f"--{name} {value!r} is not one of {', '.join(allowed)}")
    out_path = check_output_path(output, overwrite, resume)
    source = open_source(input, input_key, level=level)
    loaded = load_model(model, map_location="cpu")
    meta = loaded.metadata
    block_v = parse_ints(block, "block")
    halo_v = parse_ints(halo, "halo")
    align_v = parse_ints(alignment, "alignment")
    if halo_v is None:
        halo_v = meta.get("halo")
    if align_v is None:
        align_v = meta.get("alignment", 1)
    if ndim is None:
        ndim = len(block_v) if isinstance(block_v, tuple) else meta.get("ndim")
    if ndim is None:
        spatial = len(source.spatial_axes) if source.axes_known else 0
        ndim = spatial if spatial in (2, 3) else min(len(source.shape), 3)
    source.for_model(ndim)  # checks the image's axes fit the model before anything else
    if block_v is None:
        raise fail("--block is required for this model (e.g. --block 64,128,128)")
    if halo_v is None:
        raise fail("--halo is required for this model (the receptive-field radius, e.g. --halo 16)")
    act: Any = meta.get("activation", "none") if activation == "auto" else activation
    norm = meta.get("input_normalization")
    try:
        report = predict_file(
            loaded,
            source,
            out_path,
            block_v,
            halo_v,
            align_v,
            ndim=ndim,
            batch_size=batch_size,
            device=device,
            activation=act,
            normalization=None if norm is None else InputNormalization.from_dict(norm),
            output_dtype=output_dtype,  # type: ignore[arg-type]
            segmentation=None if segmentation == "none" else segmentation,  # type: ignore[arg-type]
            threshold=threshold,
            channel_names=meta.get("channels"),
            pyramid_levels=pyramid_levels,
            scheduler=scheduler,
            workers=workers,
            max_windows=max_windows,
            retries=retries,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
        )
    except KeyboardInterrupt:
        if out_path.suffix.lower() == ".zarr" and out_path.exists():
            typer.echo(f"nahtlos: {out_path} is incomplete; continue it with --resume", err=True)
        raise
    done = f", {report.skipped} of {report.blocks} blocks already done" if report.skipped else ""
    typer.echo(f"wrote {report.output} ({report.predicted} blocks predicted{done})")

"""The demo behind ``make demo``: a large volume, predicted out of core, seams diagnosed.

1. A synthetic 3D ``embryo`` volume (:mod:`nahtlos.paper.synth`: sparse nuclei, strongly varying
   brightness, large empty areas) is written block by block as OME-Zarr, with its
   ground-truth instance labels.
2. The two shipped networks (:mod:`nahtlos.paper.pretrained`: the same small U-Net trained with
   InstanceNorm and with BatchRenorm) predict it block-wise out of core
   (:func:`~nahtlos.engine.distributed.predict_file`), each into an OME-Zarr 0.5 image with a
   pyramid and a segmentation ``labels/argmax`` (the most probable class per voxel).
3. Optionally, the InstanceNorm network is made seamless without retraining: its norm
   layers are frozen to the statistics of the whole volume
   (:mod:`nahtlos.engine.global_stats`, computed block-wise) and it predicts a third output.
4. :func:`~nahtlos.analysis.diagnose.diagnose` runs on a central region for each network, against
   the ground truth: tile mismatch, the seam map ``|tiled - whole-image|``, train/eval
   disparity, Dice. Its HTML reports show the seams of the InstanceNorm network and their
   absence for BatchRenorm.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..axes import as_per_axis
from ..errors import NahtlosError
from ..io import InputNormalization
from ..nets.checkpoint import LoadedModel

__all__ = ["DEMO_SHAPE", "DemoModel", "DemoResult", "run_demo"]

#: Default volume (Z, Y, X): 64 Mi voxels, 128 MiB of uint16.
DEMO_SHAPE = (128, 512, 1024)
#: Default inner block of the out-of-core predictions.
DEMO_BLOCK = (64, 128, 256)
#: Default size of the central region diagnosed.
DEMO_REGION = (64, 256, 256)
_DATASET = "embryo"
_VARIANTS = (("embryo-instance", "InstanceNorm"), ("embryo-batchrenorm", "BatchRenorm"))
_GLOBAL_STATS = "embryo-instance-global-stats"


@dataclass
class DemoModel:
    """What the demo did with one network.

    Attributes
    ----------
    name, title
        The network's name (of :data:`nahtlos.paper.pretrained.PRETRAINED_MODELS` or derived
        from it) and a short human title.
    prediction
        The OME-Zarr output (probabilities per class, ``labels/argmax``: the most
        probable class).
    report
        The diagnosis folder (``report.html``, ``report.md``, ``report.json``).
    tile_mismatch
        The paper's indicator: ``"no"`` when seamless, else the largest difference.
    seam
        Largest ``|tiled - whole-image|`` prediction in the diagnosed region.
    dice
        Eval-mode Dice against the ground truth in the diagnosed region, per class.
    seconds
        Wall time of its prediction and diagnosis.
    """

    name: str
    title: str
    prediction: Path
    report: Path
    tile_mismatch: str
    seam: float
    seamless: bool
    dice: dict[str, float | None]
    headline: str
    seconds: float


@dataclass
class DemoResult:
    """Everything :func:`run_demo` wrote and measured."""

    out: Path
    image: Path
    shape: tuple[int, ...]
    block: tuple[int, ...]
    region: tuple[slice, ...]
    models: list[DemoModel] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """The text printed at the end of the demo (also ``summary.md``)."""
        voxels = int(np.prod(self.shape))
        region = "x".join(str(s.stop - s.start) for s in self.region)
        at = ",".join(f"{s.start}:{s.stop}" for s in self.region)
        lines = [
            f"nahtlos demo: {voxels / 2**20:.0f} Mi voxels predicted out of core in "
            f"{self.seconds:.0f} s",
            "",
            f"input      {self.image}  (synthetic {_DATASET}, {'x'.join(map(str, self.shape))}, "
            "ground truth in labels/instances)",
            f"blocks     {'x'.join(map(str, self.block))} voxels plus each network's halo",
            f"diagnosed  the central {region} voxels ({at})",
            "",
            "| network | tile mismatch | max abs(tiled - whole) | Dice fg / bd | prediction | report |",
            "|---|---:|---:|---:|---|---|",
        ]
        for m in self.models:
            fg, bd = m.dice.get("foreground"), m.dice.get("boundaries")
            dice = f"{_fmt(fg)} / {_fmt(bd)}"
            lines.append(
                f"| {m.title} | {m.tile_mismatch} | {m.seam:.2g} | {dice} | "
                f"{_rel(m.prediction, self.out)} | {_rel(m.report, self.out)}/report.html |"
            )
        lines += [""]
        for m in self.models:
            lines.append(f"- {m.title}: {m.headline}")
        preds = " ".join(str(m.prediction) for m in self.models)
        lines += [
            "",
            "Where to look:",
            f"- the reports: open {self.models[0].report / 'report.html'} (and the others) in a "
            "browser. The seam map shows |tiled - whole-image prediction| with the tile borders: "
            "differences along and across the tile borders for InstanceNorm, black (below "
            "float32 round-off, 1e-5) for BatchRenorm.",
            f"- the volumes (OME-Zarr 0.5, multiscale, with a labels/ segmentation): "
            f"pip install napari[all] napari-ome-zarr; napari --plugin napari-ome-zarr "
            f"{self.image} {preds}",
            f"- {self.out / 'seams.png'}: one slice of each network's seam map side by side.",
        ]
        return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def _central_region(
    shape: tuple[int, ...], size: tuple[int, ...], alignment: int
) -> tuple[slice, ...]:
    """A region of at most ``size`` in the middle of ``shape``, starting on the alignment."""
    region = []
    for n, s in zip(shape, size, strict=True):
        s = min(s, n)
        start = max(0, (n - s) // 2) // alignment * alignment
        region.append(slice(start, start + s))
    return tuple(region)


@dataclass
class _Run:
    """What every stage of the demo shares.

    The synthetic volume at ``image_path`` is opened when the run is made: its level 0
    as the source of the predictions, and the diagnosed ``region`` of the image and
    of its labels read into memory.
    """

    out: Path
    image_path: Path
    region: tuple[slice, ...]
    block: tuple[int, ...]
    tile: tuple[int, ...] | None
    output_dtype: str
    tile_sizes: Sequence[int] | None
    progress: bool
    log: Callable[[str], None]
    steps: int
    phases: dict[str, float] = field(default_factory=dict)
    tick: float = field(default_factory=time.perf_counter)
    labels_path: Path = field(init=False)
    source: Any = field(init=False)  # ImageSource of level 0
    region_image: np.ndarray = field(init=False)
    region_labels: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        from ..io import open_image, open_source

        self.labels_path = self.image_path / "labels" / "instances"
        self.source = open_source(self.image_path)
        self.region_image = np.asarray(open_image(self.image_path)[self.region])
        labels = open_image(self.image_path, "labels/instances/0")
        self.region_labels = np.asarray(labels[self.region])

    def stage(self, text: str) -> None:
        """Log a stage line (only with progress)."""
        if self.progress:
            self.log(text)

    def phase(self, name: str) -> None:
        """Record the seconds since the last phase as phase ``name``."""
        now = time.perf_counter()
        self.phases[name] = round(now - self.tick, 1)
        self.tick = now

    def predict_and_diagnose(
        self,
        name: str,
        title: str,
        model: torch.nn.Module,
        meta: dict[str, Any],
        normalization: InputNormalization,
        step: int,
    ) -> DemoModel:
        """Predict the volume out of core into OME-Zarr, then diagnose the region."""
        from ..analysis.diagnose import diagnose
        from ..engine.distributed import predict_file

        t = time.perf_counter()
        pred = self.out / f"prediction-{name}.ome.zarr"
        # step 0: this network continues the stage announced before
        head = f"[{step}/{self.steps}]" if step else " " * len(f"[{self.steps}/{self.steps}]")
        self.stage(f"{head} {title}: predicting block-wise into {pred}")
        predict_file(
            model,
            self.source,
            pred,
            self.block,
            meta["halo"],
            meta["alignment"],
            ndim=3,
            activation=meta["activation"],
            normalization=normalization,
            output_dtype=self.output_dtype,  # type: ignore[arg-type]
            segmentation="argmax",
            channel_names=meta["classes"],
            progress=self.progress,
        )
        self.phase(f"predict {name}")
        report_dir = self.out / f"diagnosis-{name}"
        self.stage(f"      {title}: diagnosing the central region into {report_dir}")
        at = ",".join(f"{s.start}:{s.stop}" for s in self.region)
        report = diagnose(
            model,
            self.region_image,
            self.region_labels,
            ndim=3,
            tile=self.tile or meta["block"],
            halo=meta["halo"],
            alignment=meta["alignment"],
            activation=meta["activation"],
            input_normalization=normalization,
            channel_names=meta["classes"],
            tile_sizes=self.tile_sizes,
            receptive_field=False,  # halo and alignment come with the checkpoint
            progress=self.progress,
            image_source=f"{self.image_path} [{at}]",
            labels_source=f"{self.labels_path} [{at}]",
            label_kind="instances",
        )
        report.write(report_dir, overwrite=True)
        self.phase(f"diagnose {name}")
        dice = dict(zip(meta["classes"], (report.dice or {}).get("eval", []), strict=False))
        return DemoModel(
            name=name,
            title=title,
            prediction=pred,
            report=report_dir,
            tile_mismatch=report.tile_mismatch.label(),
            seam=float(report.seam["max_difference"]),
            seamless=report.seamless,
            dice=dice,
            headline=report.verdict.headline,
            seconds=time.perf_counter() - t,
        )


def run_demo(
    out: str | Path = "demo-output",
    *,
    shape: Sequence[int] = DEMO_SHAPE,
    block: int | Sequence[int] = DEMO_BLOCK,
    region: Sequence[int] = DEMO_REGION,
    tile: Sequence[int] | None = None,
    seed: int = 0,
    global_stats: bool = True,
    stats_fraction: float = 1.0,
    output_dtype: str = "uint8",
    tile_sizes: Sequence[int] | None = (32, 64, 128),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo: synthesize, predict out of core with both shipped networks, diagnose.

    Parameters
    ----------
    out
        Output folder; the demo's own files in it are replaced, nothing else is touched.
    shape
        The synthetic volume (Z, Y, X).
    block
        Inner block of the out-of-core predictions (multiples of the networks'
        alignment, 4).
    region
        Size (Z, Y, X) of the central region diagnosed: the diagnosis predicts it whole
        and tiled, and sweeps ``tile_sizes``.
    tile
        The tile of the diagnosis (default: each network's own block, 64x128x128).
    seed
        Seed of the synthetic volume (the networks were trained on seed 1).
    global_stats
        Also predict with the InstanceNorm network frozen to whole-volume statistics.
    stats_fraction
        Share of the blocks those statistics are computed from (1: exact).
    output_dtype
        ``uint8`` (probabilities x 255), ``float16`` or ``float32``.
    tile_sizes
        Cubic tile sizes of the diagnosis' tile-size sweep (``None``: its default).
    progress
        Show progress bars and stage lines.
    log
        Where stage lines and the summary go.

    Returns
    -------
    DemoResult
    """
    from .pretrained import load_pretrained

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3:
        raise NahtlosError(f"the demo volume is 3D (Z, Y, X); got shape {shape_t}")
    block_t = as_per_axis(block, 3, "block")
    names = [n for n, _ in _VARIANTS] + ([_GLOBAL_STATS] if global_stats else [])
    _remove_outputs(out, names)
    steps = 2 + len(names)  # synthesize, percentiles, then one step per network
    image_path = _synthesize(out, shape_t, seed, steps, progress, log)
    models = {name: load_pretrained(name) for name, _ in _VARIANTS}
    align = max(max(m.metadata["alignment"]) for m in models.values())
    run = _Run(
        out=out,
        image_path=image_path,
        region=_central_region(shape_t, as_per_axis(tuple(region), 3, "region"), align),
        block=block_t,
        tile=None if tile is None else as_per_axis(tuple(tile), 3, "tile"),
        output_dtype=output_dtype,
        tile_sizes=tile_sizes,
        progress=progress,
        log=log,
        steps=steps,
        tick=t0,
    )
    run.phase("synthesize")
    norms = _input_normalizations(run, models)
    result = DemoResult(out, image_path, shape_t, block_t, run.region)
    for step, (name, title) in enumerate(_VARIANTS, start=3):
        loaded = models[name]
        result.models.append(
            run.predict_and_diagnose(name, title, loaded.module, loaded.metadata, norms[name], step)
        )
    if global_stats:
        instance, twin = models["embryo-instance"], models["embryo-batchrenorm"]
        result.models.append(
            _with_global_stats(run, instance, twin, norms["embryo-instance"], stats_fraction)
        )
    _finish(result, run, t0)
    return result


def _remove_outputs(out: Path, names: Sequence[str]) -> None:
    """Remove the demo's own outputs of an earlier run (of the networks ``names``)."""
    from ..io import remove_output

    for stale in [out / f"{_DATASET}.ome.zarr", out / "seams.png", out / "summary.md"] + [
        p for n in names for p in (out / f"prediction-{n}.ome.zarr", out / f"diagnosis-{n}")
    ]:
        remove_output(stale)


def _synthesize(
    out: Path,
    shape: tuple[int, ...],
    seed: int,
    steps: int,
    progress: bool,
    log: Callable[[str], None],
) -> Path:
    """Step 1: write the synthetic volume with its labels as OME-Zarr; returns its path."""
    from .synth import write_synthetic

    image_path = out / f"{_DATASET}.ome.zarr"
    if progress:
        log(
            f"[1/{steps}] writing a synthetic {_DATASET} volume {'x'.join(map(str, shape))} "
            f"({np.prod(shape) / 2**20:.0f} Mi voxels) to {image_path}"
        )
    write_synthetic(_DATASET, image_path, shape, seed=seed, progress=progress)
    return image_path


def _input_normalizations(
    run: _Run, models: dict[str, LoadedModel]
) -> dict[str, InputNormalization]:
    """Step 2: each network's input normalization, fitted on the whole volume.

    Networks that scale their input alike (both shipped ones: the same global
    percentiles) share one fit, one streaming pass.
    """
    run.stage(f"[2/{run.steps}] global input percentiles (one streaming pass over the volume)")
    norms: dict[str, InputNormalization] = {}
    for name, loaded in models.items():
        spec = {**loaded.metadata["input_normalization"], "values": None}
        key = repr(sorted(spec.items()))
        if key not in norms:
            fitted = InputNormalization.from_dict(spec).fit(run.source.array, progress=run.progress)
            norms[key] = fitted
        norms[name] = norms[key]
    run.phase("percentiles")
    return norms


def _finish(result: DemoResult, run: _Run, t0: float) -> None:
    """The seam figure, the timings, and the summary: into ``summary.md`` and the log."""
    _seam_figure(result)
    result.seconds = time.perf_counter() - t0
    result.phases = run.phases
    text = result.summary()
    (run.out / "summary.md").write_text(text + "\n")
    run.stage("")
    run.log(text)


def _with_global_stats(
    run: _Run,
    loaded: LoadedModel,
    twin: LoadedModel,
    norm: InputNormalization,
    fraction: float,
) -> DemoModel:
    """The InstanceNorm network with its norms frozen to whole-volume statistics.

    ``twin`` is a tile-independent network of the same architecture (BatchRenorm).
    """
    from ..engine.global_stats import compute_global_stats, freeze_norms
    from ..nets.checkpoint import read_checkpoint

    meta = dict(loaded.metadata)
    run.stage(
        f"[{run.steps}/{run.steps}] InstanceNorm made seamless without retraining: "
        "whole-volume statistics of its norm layers, block-wise"
    )
    # Frozen to fixed statistics, each norm is a per-channel affine map, as BatchRenorm
    # is in eval mode: the frozen network has the receptive field, hence the exact halo,
    # of the BatchRenorm network of the same architecture (measuring it takes ~10 s).
    halo = list(twin.metadata["halo"])
    mine, other = (read_checkpoint(m.path)["config"]["model"] for m in (loaded, twin))
    if {**mine, "norm": None} != {**other, "norm": None}:
        raise NahtlosError(
            f"{twin.path} is not {loaded.path} with another norm: its halo does not apply"
        )
    stats = compute_global_stats(
        loaded.module,
        run.source.for_model(3).array,
        block=run.block,
        halo=halo,
        alignment=meta["alignment"],
        ndim=3,
        fraction=fraction,
        input_transform=norm,
        progress=run.progress,
    )
    frozen = freeze_norms(loaded.module, stats).eval()
    meta["halo"] = halo
    run.phase("global statistics")
    return run.predict_and_diagnose(
        _GLOBAL_STATS, "InstanceNorm, whole-volume statistics", frozen, meta, norm, 0
    )


def _seam_figure(result: DemoResult) -> Path:
    """The reports' seam maps stacked in one picture, ``seams.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    pictures = [mpimg.imread(m.report / "figures" / "seam_map.png") for m in result.models]
    width = max(p.shape[1] for p in pictures) / 100
    heights = [p.shape[0] / 100 + 0.4 for p in pictures]
    fig, axs = plt.subplots(
        len(pictures),
        1,
        figsize=(width, sum(heights)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, m, pic in zip(axs[:, 0], result.models, pictures, strict=True):
        ax.imshow(pic)
        ax.set_axis_off()
        ax.set_title(f"{m.title}: tile mismatch {m.tile_mismatch}", fontsize=14, loc="left")
    fig.tight_layout()
    path = result.out / "seams.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

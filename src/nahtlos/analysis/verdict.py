"""The verdict of a diagnosis: what was found and what to do, in plain words.

:func:`conclude` reads the measurements (:class:`Evidence`) in three parts, each a
table of rules with its texts (DESIGN.md §1 and the paper's advice):

1. seams: whether tiles stitch into the whole-image prediction, and if not the first
   cause that applies (:data:`_CAUSES`): tile-wise normalization, layers that mix the
   whole tile, tile-wise input normalization, position-dependent layers, a halo
   smaller than the receptive field;
2. train/eval disparity, by level (:data:`_DISPARITY`);
3. the headline, from both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..io import InputNormalization
from ..nets.receptive_field import ReceptiveField
from .layers import BATCH, TILEWISE, describe_layers
from .metrics import TileMismatch, TrainEvalDisparity, mean_of
from .results import DISPARITY_THRESHOLD, DisparityLevel, SweepPoint, Verdict

__all__ = ["Evidence", "conclude", "disparity_level"]


@dataclass
class Evidence:
    """What the verdict is drawn from: the measurements and the settings they used."""

    model_kind: str
    mismatch: TileMismatch
    seam: Mapping[str, Any]
    disparity: TrainEvalDisparity
    rf: ReceptiveField | None
    layers: Sequence[Mapping[str, Any]]
    norm: InputNormalization | None
    halo: tuple[int, ...]
    halo_source: str
    alignment: tuple[int, ...]
    erf_mass: float
    dice: Mapping[str, Sequence[float | None] | None] | None
    sweep: Sequence[SweepPoint]
    channel_names: Sequence[str]
    global_info: Mapping[str, Any] | None = None

    @property
    def seamless(self) -> bool:
        """Tile mismatch "no" and the stitched prediction equal to the whole-image one."""
        return self.mismatch.seamless and bool(self.seam["seamless"])

    @property
    def tilewise(self) -> list[Mapping[str, Any]]:
        """Norm layers that normalize with the statistics of each tile."""
        return [g for g in self.layers if g["statistics"] == TILEWISE]

    @property
    def running(self) -> list[Mapping[str, Any]]:
        """Norm layers with running statistics (batch statistics in train mode)."""
        return [g for g in self.layers if g["statistics"] == BATCH]

    @property
    def tile_dependent(self) -> bool | None:
        """From the receptive field; else tile-wise norm layers; else unknown unless seamless."""
        if self.rf is not None:
            return bool(self.rf.tile_dependent)
        if self.tilewise:
            return True
        return False if self.seamless else None

    @property
    def halo_text(self) -> str:
        return ",".join(map(str, self.halo))

    @property
    def alignment_text(self) -> str:
        return ",".join(map(str, self.alignment))

    def per_channel(self, values: Sequence[float]) -> str:
        """``"cells 0.12, edges 0.3"``."""
        return ", ".join(f"{n} {v:.2g}" for n, v in zip(self.channel_names, values, strict=False))


@dataclass
class _Advice:
    """The verdict being written: findings, actions, layers to convert, the cause of seams."""

    findings: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    to_convert: list[Mapping[str, Any]] = field(default_factory=list)
    cause: str = ""


def _fmt_mean(values: Sequence[float | None] | None) -> str:
    m = mean_of(values)
    return "n/a" if m is None else f"{m:.3f}"


def disparity_level(disparity: TrainEvalDisparity) -> DisparityLevel:
    """``"none"``, ``"small"``, ``"substantial"`` or ``"not measurable"``."""
    if disparity.per_channel is None:
        return "not measurable"
    worst = max(disparity.per_channel, default=0.0)
    if worst == 0:
        return "none"
    return "substantial" if worst >= DISPARITY_THRESHOLD else "small"


# --------------------------------------------------------------------------- seams


def _seamless_finding(ev: Evidence) -> str:
    diff = ev.seam["max_difference"]
    return (
        "The tiled prediction equals the whole-image prediction ("
        + ("identical" if diff == 0 else f"largest difference {diff:.1e}")
        + ") and overlapping tiles agree (tile mismatch: no). "
        "The result does not depend on the tile size."
    )


def _disagree_finding(ev: Evidence) -> str:
    return (
        f"Tiles disagree: where two overlapping tiles both see full context their "
        f"predictions differ by up to {ev.mismatch.indicator:.2g} in probability (1 − Dice "
        f"{ev.per_channel(ev.mismatch.per_channel)}); the stitched prediction differs from the "
        f"whole-image prediction by up to {ev.seam['max_difference']:.2g}."
    )


def _global_statistics_action(ev: Evidence) -> str | None:
    """How whole-image statistics fix tile-wise norms, measured where it could be."""
    g = ev.global_info
    if g is None:
        if ev.model_kind != "torchscript":
            return None
        return (
            "Without retraining: whole-image normalization statistics "
            "(`nahtlos predict ... --norm-stats global`) make it seamless, but need the "
            "layers one by one: use the Python model or a nahtlos checkpoint, not a "
            "TorchScript file."
        )
    g_tm = g["tile_mismatch"]
    measured = (
        "seamless (tile mismatch: no)" if g_tm["seamless"] else f"tile mismatch {g_tm['label']}"
    )
    g_dice, t_dice = g.get("dice"), g.get("tile_wise_dice")
    if g_dice is not None and t_dice is not None:
        measured += (
            f"; mean Dice vs labels {_fmt_mean(g_dice)} with whole-image statistics "
            f"vs {_fmt_mean(t_dice)} tile-wise"
        )
    return (
        "Without retraining: predict with whole-image normalization statistics, "
        "`nahtlos predict MODEL IMAGE OUT --norm-stats global` (computed block-wise "
        "in one pass per norm layer; `sampled:0.1` estimates them from a tenth of "
        f"the blocks). Measured on this image: {measured}."
    )


def _large_tiles_action(ev: Evidence) -> str:
    good = [p for p in ev.sweep if min(p.agreement, default=1.0) >= 0.99]
    if good and good[0].blocks > 1:
        return (
            f"Meanwhile use tiles as large as memory allows: from tile "
            f"{'×'.join(map(str, good[0].tile))} on, the masks agree with the "
            "whole-image prediction to Dice ≥ 0.99 on every channel (tile-size sweep)."
        )
    return (
        "Meanwhile use tiles as large as memory allows; agreement with the "
        "whole-image prediction grows with the tile size (tile-size sweep)."
    )


def _tilewise_norms(ev: Evidence, out: _Advice) -> None:
    out.findings.append(
        f"The cause is {out.cause}: {describe_layers(ev.tilewise)}. Every output pixel "
        "depends on the whole tile, so no halo can make stitching exact."
    )
    out.to_convert = list(ev.tilewise)
    action = _global_statistics_action(ev)
    if action is not None:
        out.actions.append(action)
    out.actions.append(_large_tiles_action(ev))


def _tile_mixing(ev: Evidence, out: _Advice) -> None:
    culprits = ", ".join(f"{c.name} ({c.type})" for c in ev.rf.culprits[:6]) if ev.rf else ""
    out.findings.append(
        "The prediction of every pixel depends on the whole tile"
        + (f", through {culprits}." if culprits else ".")
    )
    out.actions.append(
        "Replace the layers that see the whole tile (e.g. global attention, tile-wise "
        "normalization) by local ones, or use tiles as large as memory allows."
    )


def _tilewise_input(ev: Evidence, out: _Advice) -> None:
    out.findings.append(
        "The input is scaled with the percentiles of each tile (tile-wise input "
        "normalization), so the same pixel gets a different value in every tile."
    )
    out.actions.append(
        "Scale the input with percentiles of the whole image (input normalization "
        "'global'), computed once; then train or fine-tune with the same scaling."
    )


def _position_dependent(ev: Evidence, out: _Advice) -> None:
    assert ev.rf is not None
    out.findings.append(f"The network cannot be stitched exactly: {ev.rf.reason()}.")
    out.actions.append(
        f"Use at least the halo {','.join(map(str, ev.rf.halo(ev.erf_mass)))} (the effective "
        "receptive field) to keep the differences small."
    )


def _halo_too_small(ev: Evidence, out: _Advice) -> None:
    assert ev.rf is not None and ev.rf.trf_radius is not None
    out.findings.append(
        f"The halo {ev.halo_text} ({ev.halo_source}) is smaller than the theoretical receptive "
        f"field radius {','.join(map(str, ev.rf.trf_radius))}: pixels near tile borders "
        "miss context."
    )
    out.actions.append(
        f"Use the halo {','.join(map(str, ev.rf.halo(ev.erf_mass)))} (the receptive-field "
        "radius rounded up to the alignment); `nahtlos predict` picks it when --halo "
        "is left out."
    )


def _unknown_cause(ev: Evidence, out: _Advice) -> None:
    out.findings.append(
        "No normalization with tile statistics was found: the halo may be smaller than "
        "the receptive field, or the tiles may not sit on the network's down-sampling "
        f"grid (halo {ev.halo_text}, alignment {ev.alignment_text})."
    )
    out.actions.append(
        "Measure the receptive field (`nahtlos rf MODEL`) and use its halo and alignment."
    )


def _halo_below_trf(ev: Evidence) -> bool:
    rf = ev.rf
    return (
        rf is not None
        and rf.trf_radius is not None
        and any(h < r for h, r in zip(ev.halo, rf.trf_radius, strict=True))
    )


#: Why tiles disagree: the first rule that applies names the cause and explains it.
_CAUSES: tuple[tuple[str, Callable[[Evidence], bool], Callable[[Evidence, _Advice], None]], ...] = (
    (
        "normalization with the statistics of each tile",
        lambda ev: bool(ev.tile_dependent and ev.tilewise),
        _tilewise_norms,
    ),
    ("layers that mix the whole tile", lambda ev: bool(ev.tile_dependent), _tile_mixing),
    (
        "tile-wise input normalization",
        lambda ev: ev.norm is not None and ev.norm.mode == "tilewise",
        _tilewise_input,
    ),
    (
        "position-dependent layers",
        lambda ev: ev.rf is not None and ev.rf.shift_equivariant is False,
        _position_dependent,
    ),
    ("a halo smaller than the receptive field", _halo_below_trf, _halo_too_small),
    ("", lambda ev: True, _unknown_cause),
)


def _seams(ev: Evidence, out: _Advice) -> None:
    if ev.seamless:
        out.findings.append(_seamless_finding(ev))
        return
    out.findings.append(_disagree_finding(ev))
    for cause, applies, explain in _CAUSES:
        if applies(ev):
            out.cause = cause
            explain(ev, out)
            return


# --------------------------------------------------------------------------- train/eval


def _substantial(ev: Evidence, out: _Advice) -> None:
    per_channel = ev.disparity.per_channel or []
    stats_layers = describe_layers(ev.running) or "normalization layers"
    out.findings.append(
        f"Train/eval disparity {max(per_channel):.2f} (1 − Dice, {ev.per_channel(per_channel)}): "
        "for the very same tiles the network predicts other masks in eval mode than in train "
        f"mode. The running statistics stored by its {stats_layers} do not represent the "
        "statistics of the tiles (typical after training with small batches)."
    )
    if ev.dice is not None:
        tr, evl = mean_of(ev.dice["train"]), mean_of(ev.dice["eval"])
        if tr is not None and evl is not None and tr > evl:
            out.findings.append(
                f"On your labels the mean Dice is {tr:.2f} in train mode but {evl:.2f} in "
                "eval mode: the stored statistics cost quality."
            )
    out.to_convert += [g for g in ev.running if g not in out.to_convert]
    out.actions.append(
        "Do not predict in train mode to work around the disparity: that makes every tile "
        "depend on its own content again (tiling artifacts)."
    )


def _small(ev: Evidence, out: _Advice) -> None:
    worst = max(ev.disparity.per_channel or [0.0])
    out.findings.append(
        f"Train/eval disparity is small ({worst:.2g}): eval-mode masks differ from "
        "train-mode masks only in a few uncertain pixels."
    )


def _not_measurable(ev: Evidence, out: _Advice) -> None:
    out.findings.append(
        "Train/eval disparity cannot be measured: this TorchScript file was made with "
        "torch.jit.trace, which freezes its BatchNorm layers in the mode they were traced "
        "in, so the model predicts the same in train and in eval mode."
    )
    if ev.running:
        out.actions.append(
            "To measure the train/eval disparity, diagnose the Python model, or export it "
            "with torch.jit.script instead of torch.jit.trace."
        )


def _no_disparity(ev: Evidence, out: _Advice) -> None:
    out.findings.append("Train mode and eval mode give the same masks (train/eval disparity 0).")


#: What the train/eval disparity means, by level.
_DISPARITY: dict[DisparityLevel, Callable[[Evidence, _Advice], None]] = {
    "substantial": _substantial,
    "small": _small,
    "not measurable": _not_measurable,
    "none": _no_disparity,
}


# --------------------------------------------------------------------------- verdict


def _convert_action(ev: Evidence, layers: Sequence[Mapping[str, Any]]) -> str:
    python_hint = '`nahtlos.nets.convert.convert_norms(model, "batchrenorm")` on the Python model'
    if ev.model_kind == "torchscript":  # a compiled graph cannot have its layers swapped
        hint = f" ({python_hint}; a TorchScript file cannot be converted)"
    else:
        hint = f" (`nahtlos convert MODEL OUT --to batchrenorm`, or {python_hint})"
    return (
        f"Convert the {describe_layers(layers)} to BatchRenorm and fine-tune"
        f"{hint}: BatchRenorm normalizes with the same global statistics in "
        "training and inference, so predictions are seamless and eval mode matches train "
        "mode, without the quality loss of BatchNorm with small batches."
    )


def _headline(ev: Evidence, level: DisparityLevel, out: _Advice) -> str:
    worst = max(ev.disparity.per_channel or [0.0])
    cause = out.cause
    if ev.seamless and level != "substantial":
        return (
            f"Seamless: tiles with halo {ev.halo_text} and alignment {ev.alignment_text} stitch "
            "into exactly the whole-image prediction"
            + {
                "none": ", and train and eval mode agree.",
                "not measurable": " (train/eval disparity not measurable for a traced model).",
            }.get(level, ".")
        )
    if ev.seamless:
        return (
            f"Seamless, but eval mode predicts differently from train mode (train/eval "
            f"disparity {worst:.2f}): the stored normalization statistics do not fit these "
            "images."
        )
    if level != "substantial":
        return "Not seamless: the prediction depends on how the image is tiled" + (
            f", because of {cause}." if cause else "."
        )
    return (
        "Not seamless, and eval mode predicts differently from train mode (train/eval "
        f"disparity {worst:.2f})" + (f"; the tiling artifacts come from {cause}." if cause else ".")
    )


def conclude(ev: Evidence) -> Verdict:
    """The plain-words conclusion and what to do (DESIGN.md §1 and the paper's advice)."""
    out = _Advice()
    level = disparity_level(ev.disparity)
    _seams(ev, out)
    _DISPARITY[level](ev, out)
    if out.to_convert:
        out.actions.insert(0, _convert_action(ev, out.to_convert))
    headline = _headline(ev, level, out)
    if ev.seamless and level != "substantial" and not out.actions:
        out.actions.append(
            f"Nothing to fix. Predict tile by tile with halo {ev.halo_text} and alignment "
            f"{ev.alignment_text} (`nahtlos predict MODEL IMAGE OUT --halo {ev.halo_text} "
            f"--alignment {ev.alignment_text}`); every tile size gives the same result."
        )
    return Verdict(
        seamless=ev.seamless,
        tile_dependent=ev.tile_dependent,
        disparity=level,
        headline=headline,
        findings=out.findings,
        actions=out.actions,
    )

"""The layers to blame for tile dependence: every layer probed on its own.

A model is tile-dependent when its TRF covers the whole input at two probe sizes. The
layers to blame are found by probing every layer of the probe copy on the inputs it
sees inside the network (:func:`~.locality.mixes_globally`); the culprits reported
are the innermost global layers. Leaves (layers without sub-layers) are probed first,
which is cheap and reliable; a block of layers only if none of its sub-layers is
global.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .locality import mixes_globally
from .probe_model import checked_forward, first_tensor
from .prober import Prober
from .result import Culprit

__all__ = ["CulpritFinder"]

# A layer with the (positional, keyword) arguments it takes inside the network.
_LayerInput = tuple[str, torch.nn.Module, tuple[Any, ...], dict[str, Any]]


def _innermost(names: Sequence[str]) -> list[str]:
    chosen = []
    for n in names:
        if n == "":
            if len(names) == 1:
                chosen.append(n)
            continue
        if not any(o != n and o.startswith(n + ".") for o in names):
            chosen.append(n)
    return chosen


def _type_name(m: torch.nn.Module) -> str:
    return str(getattr(m, "original_name", None) or type(m).__name__)


def _module_layer_inputs(prober: Prober) -> list[_LayerInput]:
    """Each sub-module's first input, caught by forward pre-hooks on a probe pass."""
    captured: dict[str, tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any]]] = {}
    handles = []

    def clone(v: Any) -> Any:
        return v.detach().clone() if isinstance(v, torch.Tensor) else v

    def hook(name: str) -> Callable[..., None]:
        def fn(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in captured:
                leaves, spec = tree_flatten((args, kwargs))
                a, k = tree_unflatten([clone(v) for v in leaves], spec)
                captured[name] = (module, a, k)

        return fn

    for name, module in prober.probe.named_modules():
        handles.append(module.register_forward_pre_hook(hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            checked_forward(prober.probe, prober.input(prober.base))
    finally:
        for h in handles:
            h.remove()
    return [(n, m, a, k) for n, (m, a, k) in captured.items()]


def _script_layer_inputs(prober: Prober) -> list[_LayerInput]:
    """TorchScript modules take no hooks: each sub-module gets the first feature-map
    shape seen inside the network that it accepts."""
    candidates = list(dict.fromkeys(prober.feature_shapes(prober.base)))
    found: list[_LayerInput] = []
    with torch.no_grad(), warnings.catch_warnings():
        # Sub-modules fed shapes meant for others may warn (e.g. num_features).
        warnings.simplefilter("ignore")
        for name, module in prober.probe.named_modules():
            for shape in candidates:
                t = torch.rand(shape, generator=prober.gen, dtype=torch.float64)
                t = (t * 0.01 + 0.005).to(prober.device)
                try:
                    out = first_tensor(module(t.clone()))
                except Exception:
                    continue
                if out is not None:
                    found.append((name, module, (t,), {}))
                    break
    return found


class CulpritFinder:
    """Which layers of the prober's model mix their whole input (computed once, cached)."""

    def __init__(self, prober: Prober) -> None:
        self.prober = prober
        self._layer_inputs: list[_LayerInput] | None = None
        self._leaves: dict[str, bool] | None = None
        self._culprits: tuple[Culprit, ...] | None = None

    def _layers(self) -> list[_LayerInput]:
        """Every layer with an input it takes inside the network (probe weights, base shape)."""
        if self._layer_inputs is None:
            self.prober.bar.set_description("receptive field: probing layers")
            if isinstance(self.prober.probe, torch.jit.ScriptModule):
                self._layer_inputs = _script_layer_inputs(self.prober)
            else:
                self._layer_inputs = _module_layer_inputs(self.prober)
        return self._layer_inputs

    def _leaf_verdicts(self) -> dict[str, bool]:
        if self._leaves is None:
            self._leaves = {}
            with torch.no_grad():
                for name, module, a, k in self._layers():
                    if next(module.children(), None) is None:
                        self._leaves[name] = mixes_globally(module, a, k, self.prober.ndim)
        return self._leaves

    def any_leaf(self) -> bool:
        """Whether some layer without sub-layers mixes its whole input (cheap, reliable)."""
        return any(self._leaf_verdicts().values())

    def culprits(self) -> tuple[Culprit, ...]:
        """The innermost layers that mix their whole input.

        Leaves are probed first; a block of layers is probed only if none of its
        sub-layers is global (otherwise it cannot be innermost), on enlarged inputs
        too, since a block of local layers can reach across a small input while a
        global one reaches across any size.
        """
        if self._culprits is not None:
            return self._culprits
        layers = {name: (m, a, k) for name, m, a, k in self._layers()}
        verdict = dict(self._leaf_verdicts())
        # Deepest blocks first, so that their verdicts are known before their parents'.
        blocks = sorted(
            (n for n in layers if n not in verdict), key=lambda n: -n.count(".") - (n != "")
        )
        with torch.no_grad():
            for n in blocks:
                inner = [o for o in verdict if n == "" or o.startswith(n + ".")]
                if any(verdict[o] for o in inner):
                    verdict[n] = True
                    continue
                m, a, k = layers[n]
                verdict[n] = mixes_globally(
                    m, a, k, self.prober.ndim, sizes=(16, 32, 64), max_elements=2**20
                )
        chosen = _innermost([n for n, v in verdict.items() if v])
        self._culprits = tuple(Culprit(n or "(model)", _type_name(layers[n][0])) for n in chosen)
        return self._culprits

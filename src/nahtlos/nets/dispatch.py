"""A dispatch mode that sees every op a model runs: the base of the probes and the memory tracker.

A :class:`~torch.utils._python_dispatch.TorchDispatchMode` is called for each aten op
below autograd, so it also reaches ops inside TorchScript and functional code, where
module hooks cannot. The receptive-field probes rewrite some ops (structural
backward passes, frozen normalization statistics) and record feature-map shapes;
the block search's memory tracker records the bytes each op allocates. Both run the
op the same way and look at its result, which :class:`ObservingMode` does once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ObservingMode"]


class ObservingMode(TorchDispatchMode):
    """Runs each op, or the replacement :meth:`rewrite` gives, and shows it to :meth:`observe`.

    A replacement is called as ``replacement(func, *args, **kwargs)``, so that it can
    fall back to the original op ``func``.
    """

    def rewrite(self, func: Any) -> Callable[..., Any] | None:
        """The function to run instead of ``func``, or ``None`` to run ``func`` itself."""
        return None

    def observe(self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        """Look at an op's inputs and its result (after it ran)."""

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        replacement = self.rewrite(func)
        out = (
            replacement(func, *args, **kwargs) if replacement is not None else func(*args, **kwargs)
        )
        self.observe(args, kwargs, out)
        return out

"""The exception and warning hierarchy of nahtlos.

Every error raised on purpose by nahtlos derives from :class:`NahtlosError`, and
also from the builtin a caller would naturally catch (``ValueError``,
``FileNotFoundError``, ...), so that ``except ValueError`` keeps working for code
that does not know nahtlos.
"""

from __future__ import annotations

__all__ = [
    "BlockFailedError",
    "BlockShapeError",
    "FormatError",
    "IncompleteOutputError",
    "InputNotFoundError",
    "NahtlosError",
    "NahtlosWarning",
    "NormError",
    "SettingsError",
    "ShapeMismatchError",
]


class NahtlosError(Exception):
    """Base class of all errors raised by nahtlos."""


class BlockShapeError(NahtlosError, ValueError):
    """A block shape, halo or alignment that cannot give exact block-wise prediction."""


class ShapeMismatchError(NahtlosError, ValueError):
    """Two arrays (image and labels, model input and output, ...) have incompatible shapes."""


class FormatError(NahtlosError, ValueError):
    """A file format, extension or dataset key that nahtlos cannot read or write."""


class InputNotFoundError(NahtlosError, FileNotFoundError):
    """An input file, dataset or model does not exist."""


class IncompleteOutputError(NahtlosError, RuntimeError):
    """An output exists but was not completely written (an interrupted run)."""


class SettingsError(NahtlosError, ValueError):
    """Settings of a run that contradict each other (e.g. uint8 output without activation)."""


class BlockFailedError(NahtlosError, RuntimeError):
    """Predicting a block failed (after its retries); ``block`` is its grid index."""

    def __init__(self, message: str, block: tuple[int, ...] | None = None) -> None:
        super().__init__(message)
        self.block = block


class NormError(NahtlosError, ValueError):
    """An unknown norm name, an invalid norm setting, or norm layers that cannot be converted."""


class NahtlosWarning(UserWarning):
    """Warnings about values nahtlos adjusted or results that may not be exact."""

"""Helpers shared by the sub-commands: option parsing and error reporting."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from ..errors import NahtlosError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_USAGE = 2


def fail(message: str) -> typer.Exit:
    """Print a one-line error and return the exit to raise (exit code 2)."""
    typer.echo(f"nahtlos: error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def cli_errors(func: F) -> F:
    """Turn nahtlos errors (and missing files) into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (NahtlosError, FileNotFoundError) as exc:
            raise fail(str(exc).replace("\n", " ")) from None
        except KeyboardInterrupt:
            typer.echo("nahtlos: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def parse_ints(text: str | None, name: str) -> int | tuple[int, ...] | None:
    """Parse ``"64"`` or ``"32,64,64"``; ``None`` and ``"auto"`` give ``None``."""
    if text is None or text.strip().lower() == "auto":
        return None
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise fail(
            f"--{name} {text!r} is not an integer or a comma-separated list of integers"
        ) from None
    if not values:
        raise fail(f"--{name} is empty")
    return values[0] if len(values) == 1 else values

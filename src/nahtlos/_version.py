"""The package version (its own module, so that any layer can stamp files with it)."""

__version__ = "0.1.0"

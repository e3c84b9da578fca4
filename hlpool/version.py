"""The package version (one place; snapshot files record it)."""

__version__ = "0.1.0"

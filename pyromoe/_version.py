"""The installed package's version, read once from its metadata (``pyproject.toml`` is the source)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__: str = version("pyromoe")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

"""Exceptions raised at leukoscope's boundaries. Each message names what was received and from where."""

from __future__ import annotations


class LeukoscopeError(Exception):
    """Base class for every error leukoscope raises on purpose."""


class ImageReadError(LeukoscopeError, ValueError):
    """An image file could not be read: it is missing, empty, corrupt, truncated, too large or not an image."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")


class DatasetNotFoundError(LeukoscopeError, FileNotFoundError):
    """A dataset root does not exist or does not have the expected layout."""


class SplitLeakError(LeukoscopeError):
    """A split puts one group (patient, field, ...) on both sides."""


class MissingExtraError(LeukoscopeError, ImportError):
    """An optional dependency is not installed."""


def require(module: str, extra: str, purpose: str) -> object:
    """Import an optional dependency, or say which extra installs it (scikit-learn's check_matplotlib_support)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} needs the '{module}' package: pip install 'leukoscope[{extra}]'"
        ) from exc

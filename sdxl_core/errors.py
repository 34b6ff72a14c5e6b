"""Errors that sdxl-bench raises for bad input. Each message names the input and the fix."""

from __future__ import annotations


class SdxlBenchError(ValueError):
    """Base class: bad input or an unusable environment, reported before any work starts."""


class ModelNotFoundError(SdxlBenchError):
    """A model id or folder that cannot be loaded."""


class InvalidConfigError(SdxlBenchError):
    """A generation or benchmark setting outside its valid range."""


class MissingDependencyError(SdxlBenchError):
    """A package or weights file that a requested feature needs is not available."""

"""Models: CNN backbones, the hybrid CNN-Transformer, and loading a trained model directory.

The names below are imported on first use, so that importing a light submodule (``leukoscope.models.ood``) or
the command line's ``--help`` does not import PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DEFAULT_MODEL", "MODELS", "LoadedModel", "build_network", "load_model", "resolve_model_dir",
           "shipped_models"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("leukoscope.models.modeldir"), name)
    raise AttributeError(f"module 'leukoscope.models' has no attribute {name!r}")

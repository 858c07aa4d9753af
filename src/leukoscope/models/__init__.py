"""Models: CNN backbones, the hybrid CNN-Transformer, and loading a trained model directory."""

from leukoscope.models.modeldir import (
    DEFAULT_MODEL,
    MODELS,
    LoadedModel,
    build_network,
    load_model,
    resolve_model_dir,
    shipped_models,
)

__all__ = ["DEFAULT_MODEL", "MODELS", "LoadedModel", "build_network", "load_model", "resolve_model_dir",
           "shipped_models"]

"""leukoscope: finds leukemia in microscope images of peripheral blood smears and explains what it saw.

Public API::

    import leukoscope
    model = leukoscope.load_model()                 # the shipped 'leukemia-cell' model
    pred = leukoscope.predict("cell.png", model)    # label, calibrated confidence, probabilities
    res = leukoscope.explain("cell.png", model=model)  # + Grad-CAM heatmap and overlay
    ds = leukoscope.load_dataset("aria")            # samples with labels and patient-level groups
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["load_model", "predict", "explain", "load_dataset", "list_datasets", "shipped_models", "__version__"]


def __getattr__(name: str) -> Any:  # lazy: `import leukoscope` stays cheap (no torch until needed)
    if name == "load_model" or name == "shipped_models":
        from leukoscope.models import modeldir

        return getattr(modeldir, name)
    if name == "predict":
        from leukoscope.predict import predict

        return predict
    if name == "explain":
        from leukoscope.explain import explain

        return explain
    if name in ("load_dataset", "list_datasets"):
        from leukoscope.data import datasets

        return getattr(datasets, name)
    raise AttributeError(f"module 'leukoscope' has no attribute {name!r}")

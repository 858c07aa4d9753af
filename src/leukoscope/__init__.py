"""leukoscope: finds leukemia in microscope images of peripheral blood smears and explains what it saw.

Public API::

    import leukoscope
    model = leukoscope.load_model()                 # the shipped 'leukemia-cell' model
    pred = leukoscope.predict("cell.png", model)    # label, calibrated confidence, probabilities
    res = leukoscope.explain("cell.png", model=model)  # + Grad-CAM heatmap and overlay
    ds = leukoscope.load_dataset("aria")            # samples with labels and patient-level groups

``leukoscope.predict`` and ``leukoscope.explain`` are the functions; the modules of the same names are reached with
``from leukoscope.predict import predict_files`` or ``from leukoscope.explain import gradcam_array``.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["load_model", "predict", "explain", "load_dataset", "list_datasets", "shipped_models", "__version__"]

# public name -> the module that defines it, imported on first use: `import leukoscope` stays cheap (no torch)
_LAZY = {
    "load_model": "leukoscope.models.modeldir",
    "shipped_models": "leukoscope.models.modeldir",
    "predict": "leukoscope.predict",
    "explain": "leukoscope.explain",
    "load_dataset": "leukoscope.data.datasets",
    "list_datasets": "leukoscope.data.datasets",
}

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports these on first use
    from leukoscope.data.datasets import list_datasets, load_dataset
    from leukoscope.explain import explain
    from leukoscope.models.modeldir import load_model, shipped_models
    from leukoscope.predict import predict


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'leukoscope' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value  # later look-ups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(ModuleType):
    """The ``leukoscope`` module, whose public functions ``predict`` and ``explain`` share their names with a submodule.

    The first import of a submodule (``import leukoscope.predict``, ``from leukoscope.explain import cam``, or the
    function's own lazy import) binds the submodule to the package attribute of the same name, which would replace the
    function: the second ``leukoscope.predict(...)`` would call a module. That one binding is refused; every other
    assignment (a test's monkeypatch included) goes through.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

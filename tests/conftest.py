"""Shared fixtures. Tests read real data from ../shared/data (or $LEUKOSCOPE_DATA_ROOT) and fail, never skip, when it
is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leukoscope.data.datasets import data_root_candidates

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may need a download
os.environ.setdefault("LEUKOSCOPE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "leukoscope"))


def _data_root() -> Path:
    for base in data_root_candidates():
        if (base / "README.md").exists() or (base / "all_aria").is_dir():
            return base
    pytest.fail("real data not found; looked in: " + ", ".join(str(p) for p in data_root_candidates())
                + ". Put the shared data beside the project (../shared/data) or set LEUKOSCOPE_DATA_ROOT.")


@pytest.fixture(scope="session")
def data_root() -> Path:
    return _data_root()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, data_root) -> Path:
    """A real EfficientNet-Lite0 model trained briefly on ALL-IDB2 (cached stem features; ~1 min the first time)."""
    from leukoscope.config import make_config
    from leukoscope.train.trainer import train

    out = tmp_path_factory.mktemp("models") / "tiny"
    cfg = make_config({"name": "tiny", "datasets": ("all_idb2",), "epochs": 4, "aug_views": 1, "patience": 10,
                       "batch_size": 32})
    train(cfg, out, progress=False)
    return out

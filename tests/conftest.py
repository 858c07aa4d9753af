"""Shared fixtures. Tests read real data from ../shared/data (or $LEUKOSCOPE_DATA_ROOT) and fail, never skip, when it
is missing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leukoscope.data.datasets import data_root_candidates

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

"""Fixtures for the flow tests: the real FlowCAP-II files, read in place (a missing folder fails, never skips)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def flow_root() -> Path:
    from leukoscope.errors import DatasetNotFoundError
    from leukoscope.flow.data import flow_data_root

    try:
        return flow_data_root()
    except DatasetNotFoundError as exc:  # fail with the places looked at
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def raw_dir(flow_root: Path) -> Path:
    return flow_root / "flowcap2_aml_raw_fcs"


@pytest.fixture(scope="session")
def cytodx_dir(flow_root: Path) -> Path:
    return flow_root / "flowcap2_aml_cytodx_fcs"


@pytest.fixture(scope="session")
def shipped_model():
    from leukoscope.flow.model import load_flow_model

    return load_flow_model()

"""Fixtures for the server's tests: the shipped model loaded once (ONNX Runtime and PyTorch), an app on a temporary
audit log, a live uvicorn server on a free loopback port, and real images from the shared data."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from leukoscope.data.datasets import load_dataset

# The shipped model; LEUKOSCOPE_TEST_MODEL may name another model directory to run these tests against.
TEST_MODEL = os.environ.get("LEUKOSCOPE_TEST_MODEL", "leukemia-cell")


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from leukoscope.models.modeldir import SHIPPED_DIR, resolve_model_dir

    try:
        return resolve_model_dir(TEST_MODEL)
    except (ValueError, FileNotFoundError) as exc:
        pytest.fail(f"the model {TEST_MODEL!r} the server tests need was not found ({exc}); looked in {SHIPPED_DIR} "
                    f"(set LEUKOSCOPE_TEST_MODEL to a model directory to use another)")


@pytest.fixture(scope="session")
def served_models(model_dir) -> dict:
    """The same weights twice: ``main`` on the automatic backend (ONNX Runtime), ``main-torch`` on PyTorch."""
    from leukoscope.models import load_model

    return {"main": load_model(model_dir), "main-torch": load_model(model_dir, backend="torch")}


@pytest.fixture(scope="session")
def cell_paths(data_root) -> list[Path]:
    """Real ALL-IDB2 single-cell TIFFs, both classes."""
    s = load_dataset("all_idb2").samples
    return [s[0].path, s[1].path, s[-2].path, s[-1].path]


@pytest.fixture(scope="session")
def field_path(data_root) -> Path:
    """A real ALL-IDB1 whole smear field (JPEG)."""
    return load_dataset("all_idb1").samples[0].path


@pytest.fixture(scope="module")
def app(served_models, tmp_path_factory):
    from leukoscope.serve import ServeConfig, create_app

    tmp = tmp_path_factory.mktemp("serve")
    cfg = ServeConfig(audit_db=tmp / "audit.sqlite", store_images=tmp / "images", max_upload_bytes=3_000_000,
                      max_pixels=10_000_000)
    return create_app(served_models, cfg)


@pytest.fixture(scope="module")
def client(app):
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(app):
    """uvicorn serving ``app`` in a thread on 127.0.0.1 and a free port; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)

"""``leukoscope serve``: its options reach the app and uvicorn; it listens on loopback unless told otherwise and warns
when told otherwise."""

from __future__ import annotations

import pytest

from leukoscope.cli import main, parse_args


def test_defaults():
    args = parse_args(["serve"])
    assert (args.host, args.port, args.model, args.store_images) == ("127.0.0.1", 8000, None, None)
    assert args.audit_db == "leukoscope-audit.sqlite" and args.max_upload_mb == 20.0 and not args.log_client


@pytest.mark.parametrize("host,warns", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_serve_builds_the_app_and_runs_uvicorn(host, warns, served_models, model_dir, cell_paths, tmp_path,
                                               monkeypatch, capsys):
    import uvicorn
    from fastapi.testclient import TestClient

    import leukoscope.serve.app as serve_app

    monkeypatch.setattr(serve_app, "load_model", lambda spec, backend="auto", **_: served_models["main"])
    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: ran.update(app=app, host=host, port=port))
    rc = main(["serve", "--model", str(model_dir), "--host", host, "--port", "8123", "--audit-db",
               str(tmp_path / "a.sqlite"), "--store-images", str(tmp_path / "imgs"), "--max-upload-mb", "1",
               "--log-client"])
    assert rc == 0 and ran["host"] == host and ran["port"] == 8123
    err = capsys.readouterr().err
    assert ("WARNING" in err) == warns and str(tmp_path / "a.sqlite") in err
    state = ran["app"].state.leukoscope
    assert state.config.max_upload_bytes == 1024 * 1024 and state.config.log_client
    with TestClient(ran["app"]) as c:
        r = c.post("/v1/predict", files={"file": ("c.tif", cell_paths[0].read_bytes(), "image/tiff")})
        assert r.status_code == 200
        row = state.audit.entries()[-1]
        assert row["client"] == "testclient" and row["image_path"].startswith(str(tmp_path / "imgs"))
        assert c.post("/v1/predict", files={"file": ("big.tif", b"\0" * (1024 * 1024 + 1))}).status_code == 413


def test_without_fastapi_the_core_imports_and_the_error_names_the_extra():
    import subprocess
    import sys

    code = ("import argparse, sys; sys.modules['fastapi'] = None\n"
            "import leukoscope.serve, leukoscope.cli.serve\n"
            "from leukoscope.serve.audit import AuditLog\n"
            "p = argparse.ArgumentParser(); leukoscope.cli.serve.add_parser(p.add_subparsers())\n"
            "try:\n"
            "    leukoscope.cli.serve.main(p.parse_args(['serve']))\n"
            "except leukoscope.errors.MissingExtraError as exc:\n"
            "    print(exc)\n"
            "try:\n"
            "    from leukoscope.serve import create_app\n"
            "except leukoscope.errors.MissingExtraError as exc:\n"
            "    print(exc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["the web server needs the 'fastapi' package: pip install 'leukoscope[serve]'"] * 2

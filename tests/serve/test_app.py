"""The REST API: the same probabilities as ``leukoscope predict`` and the Python call, ONNX within 1e-4 of PyTorch,
explanations and field scans that match the library, an audit row per answer, and bad input that gets a 4xx with a
message while the server keeps serving."""

from __future__ import annotations

import base64
import csv
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from leukoscope.cli import main as cli_main
from leukoscope.data.images import read_image
from leukoscope.models.modeldir import file_sha256
from leukoscope.predict import predict


def _post(client, path, endpoint="/v1/predict", name=None, data=None, ctype="image/tiff", **form):
    body = path.read_bytes() if data is None else data
    return client.post(endpoint, files={"file": (name or path.name, body, ctype)}, data=form)


def _decode(img: dict) -> np.ndarray:
    assert img["media_type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(img["data"]))))


def _png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h pixels but holds almost no data (a decompression bomb's shape)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_predict_equals_cli_and_python_call(client, served_models, model_dir, cell_paths, tmp_path, monkeypatch):
    import leukoscope.models

    # The CLI's own code path (collect_paths, predict_files, write_csv) on the model already loaded, not a second copy.
    monkeypatch.setattr(leukoscope.models, "load_model", lambda name, backend="auto", **_: served_models["main"])
    out = tmp_path / "cli.csv"
    assert cli_main(["predict", *map(str, cell_paths), "--model", str(model_dir), "--output", str(out),
                     "--no-progress"]) == 0
    rows = {r["path"]: r for r in csv.DictReader(out.open())}
    model = served_models["main"]
    for path in cell_paths:
        r = _post(client, path)
        assert r.status_code == 200, r.text
        got = r.json()
        assert set(got["probabilities"]) == set(model.classes)
        row = rows[str(path)]
        for c in model.classes:  # the CLI's CSV has 6 decimals
            assert got["probabilities"][c] == pytest.approx(float(row[f"p_{c}"]), abs=1e-6)
        ref = predict(path, model)
        np.testing.assert_allclose([got["probabilities"][c] for c in model.classes],
                                   [ref.probabilities[c] for c in model.classes], rtol=1e-6, atol=1e-7)
        assert got["label"] == ref.label == row["label"]
        # the out-of-distribution flag and the quality warnings are the library's and the CLI's
        assert got["ood"] is ref.ood is (row["ood"] == "true") and got["ood_threshold"] == model.ood.threshold
        assert got["ood_score"] == pytest.approx(ref.ood_score, rel=1e-5)
        assert [w["code"] for w in got["warnings"]] == [c for c, _ in ref.warnings] == \
            [c for c in row["warnings"].split(";") if c]
        assert got["confidence"] == pytest.approx(max(got["probabilities"].values()), abs=1e-7)
        assert got["filename"] == path.name and got["backend"] == "onnx"
        assert got["sha256"] == file_sha256(path)
        assert got["image_size"] == [257, 257]


def test_onnx_answers_equal_pytorch_backend(client, served_models, cell_paths):
    torch_model = served_models["main-torch"]
    assert served_models["main"].backend == "onnx" and torch_model.backend == "torch"
    ref = torch_model.predict_arrays([read_image(p) for p in cell_paths])
    for path, p_ref in zip(cell_paths, ref, strict=True):
        onnx = _post(client, path).json()
        via_torch = client.post("/v1/predict?model=main-torch", files={"file": (path.name, path.read_bytes())}).json()
        assert via_torch["backend"] == "torch" and via_torch["model"] == "main-torch"
        classes = torch_model.classes
        np.testing.assert_allclose([onnx["probabilities"][c] for c in classes], p_ref, atol=1e-4)
        np.testing.assert_allclose([via_torch["probabilities"][c] for c in classes], p_ref, rtol=1e-5, atol=1e-6)


def test_model_selected_by_form_field_or_query(client, cell_paths):
    path = cell_paths[0]
    assert _post(client, path, model="main-torch").json()["model"] == "main-torch"
    assert _post(client, path).json()["model"] == "main"  # the first model is the default
    r = client.post("/v1/predict?model=main", files={"file": (path.name, path.read_bytes())},
                    data={"model": "main-torch"})
    assert r.status_code == 400 and "two different models" in r.json()["detail"]
    r = client.post("/v1/predict?model=mian", files={"file": (path.name, path.read_bytes())})
    assert r.status_code == 404 and "Did you mean 'main'" in r.json()["detail"]


def test_explain_returns_prediction_and_heatmap(client, served_models, cell_paths):
    from leukoscope.explain import explain

    path = cell_paths[0]
    r = _post(client, path, "/v1/explain", include_image="true")
    assert r.status_code == 200, r.text
    got = r.json()
    pred = _post(client, path).json()
    assert got["label"] == pred["label"]
    for c, p in pred["probabilities"].items():
        assert got["probabilities"][c] == pytest.approx(p, abs=1e-6)
    rgb = read_image(path)
    overlay, heat, image = _decode(got["overlay"]), _decode(got["heatmap"]), _decode(got["image"])
    assert overlay.shape == rgb.shape and heat.shape == rgb.shape[:2]
    np.testing.assert_array_equal(image, rgb)
    assert heat.max() >= 200  # normalised to the peak (resizing back to 257 px may shave the top)
    ref = explain(rgb, model=served_models["main"])
    np.testing.assert_allclose(heat / 255.0, ref.heatmap, atol=1 / 255 + 1e-6)
    assert got["hottest_region"]["bbox"] == ref.region["bbox"] and got["method"] == "gradcam"
    assert got["faithfulness"] == ref.faithfulness and got["faithfulness"]["verdict"]  # the model's record, as is
    assert not np.array_equal(overlay, rgb)  # the heat really is blended in
    assert _decode(got["figure"]).shape[0] > rgb.shape[0]  # a caption strip above the image
    r = _post(client, path, "/v1/explain", method="scorecam")
    assert r.status_code == 400 and "Available: ['gradcam', 'gradcam++', 'layercam']" in r.json()["detail"]
    assert _post(client, path, "/v1/explain", method="layercam").json()["method"] == "layercam"


def test_scan_field_matches_library(client, served_models, field_path):
    from leukoscope.scan import ScanConfig, scan_field

    r = _post(client, field_path, "/v1/scan", ctype="image/jpeg")
    assert r.status_code == 200, r.text
    got = r.json()
    rgb = read_image(field_path)
    ref = scan_field(rgb, served_models["main"], ScanConfig(gradcam=False))
    assert got["white_cells"] == ref.n_white_cells == len(got["cells"]) - got["partial_cells"] > 0
    assert got["partial_cells"] == ref.n_partial == sum(c["partial"] for c in got["cells"])
    assert got["abnormal_cells"] == ref.n_abnormal
    assert got["abnormal_cells_ci95"] == list(ref.abnormal_count_interval())
    assert got["abnormal_share_ci95"] == pytest.approx(ref.abnormal_share_interval(), abs=1e-4)
    assert got["detection"]["detector"] == "learned"  # the page and the API show the learned detector's cells
    assert [c["label"] for c in got["cells"]] == [c.label for c in ref.cells]
    h, w = rgb.shape[:2]
    assert got["image_size"] == [w, h]
    for c, rc in zip(got["cells"], ref.cells, strict=True):
        x0, y0, x1, y1 = c["bbox"]
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and c["bbox"] == list(rc.cell.bbox)
        assert c["confidence"] == pytest.approx(rc.confidence, abs=1e-4)
    assert got["overlay"]["media_type"] == "image/jpeg" and got["overlay"]["width"] <= 1600


def test_models_and_health(client, served_models, model_dir):
    models = client.get("/v1/models").json()
    assert [m["name"] for m in models] == ["main", "main-torch"] and models[0]["default"]
    m = models[0]
    assert m["classes"] == served_models["main"].classes
    assert m["weights_sha256"] == file_sha256(model_dir / "model.safetensors")
    assert m["metrics"] == json.loads((model_dir / "metrics.json").read_text())
    assert m["card"] == (model_dir / "MODEL_CARD.md").read_text()
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["models"] == ["main", "main-torch"] and h["default_model"] == "main"
    schema = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/v1/scan", "/v1/models", "/health"} <= set(schema["paths"])
    for page in ("/", "/docs"):  # served by the app itself, nothing from elsewhere
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert "http://" not in r.text and "https://" not in r.text
    for asset in ("app.js", "style.css", "docs.js"):
        r = client.get(f"/static/{asset}")
        assert r.status_code == 200 and "https://" not in r.text and "http://" not in r.text


def test_every_answer_is_audited(client, app, cell_paths):
    audit = app.state.leukoscope.audit
    path = cell_paths[1]
    got = _post(client, path).json()
    row = audit.entries(limit=1)[0]
    assert row["id"] == got["audit_id"] and row["endpoint"] == "predict" and row["model"] == "main"
    assert row["input_sha256"] == file_sha256(path) and row["weights_sha256"] == got["weights_sha256"]
    assert row["outputs"]["probabilities"] == got["probabilities"] and row["outputs"]["label"] == got["label"]
    assert row["client"] is None  # addresses are recorded only with log_client
    # This app keeps images (store_images): under their hash, never under the client's name.
    stored = app.state.leukoscope.audit.store_images / row["input_sha256"][:2] / f"{row['input_sha256']}.tif"
    assert row["image_path"] == str(stored) and stored.read_bytes() == path.read_bytes()


_BOUNDARY = "leukoscope-test-boundary"


def _chunked_multipart(payload: bytes):
    """A multipart body sent in chunks without Content-Length (Transfer-Encoding: chunked)."""
    head = (f'--{_BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.tif"\r\n'
            f"Content-Type: image/tiff\r\n\r\n").encode()
    body = head + payload + f"\r\n--{_BOUNDARY}--\r\n".encode()
    return iter([body[i:i + 65536] for i in range(0, len(body), 65536)])


def _bad_requests(cell: bytes) -> dict:
    png = io.BytesIO()
    Image.open(io.BytesIO(cell)).save(png, format="PNG")
    png = png.getvalue()
    return {
        "non-image": (dict(files={"file": ("notes.png", b"these are not pixels", "image/png")}), 422,
                      "not a recognised image format"),
        "truncated": (dict(files={"file": ("half.png", png[: len(png) // 2], "image/png")}), 422, "truncated"),
        "empty": (dict(files={"file": ("empty.png", b"", "image/png")}), 422, "empty"),
        "huge dimensions": (dict(files={"file": ("bomb.png", _png_header(5000, 5000), "image/png")}), 422,
                            "above the limit"),
        "raw body": (dict(content=cell, headers={"content-type": "image/tiff"}), 415, "multipart/form-data"),
        "json body": (dict(json={"file": "cell.tif"}), 415, "multipart/form-data"),
        "text part": (dict(files={"file": ("cell.txt", cell, "text/plain")}), 415, "content type 'text/plain'"),
        "no file field": (dict(files={"image": ("cell.tif", cell, "image/tiff")}), 400, "field 'file'"),
        "body too large": (dict(files={"file": ("big.tif", cell * (3_000_000 // len(cell) + 1), "image/tiff")}), 413,
                           "this server's limit of 3,000,000 bytes"),
        "chunked body too large": (dict(content=_chunked_multipart(cell * (3_000_000 // len(cell) + 1)),
                                        headers={"content-type": f"multipart/form-data; boundary={_BOUNDARY}"}),
                                   413, "request body exceeds this server's limit of 3,000,000 bytes"),
        "bad form value": (dict(files={"file": ("cell.tif", cell, "image/tiff")}, data={"include_image": "maybe"}),
                           422, "include_image"),
    }


BAD_CASES = ["non-image", "truncated", "empty", "huge dimensions", "raw body", "json body", "text part",
             "no file field", "body too large", "chunked body too large", "bad form value"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gets_4xx_then_server_still_serves(client, cell_paths, case):
    cell = cell_paths[0].read_bytes()
    for endpoint in ("/v1/predict", "/v1/explain"):
        kwargs, status, words = _bad_requests(cell)[case]  # afresh: a chunked body is consumed by sending it
        r = client.post(endpoint, **kwargs)
        assert r.status_code == status, (case, endpoint, r.text)
        assert r.headers["content-type"].startswith("application/json")
        detail = r.json()["detail"]
        assert isinstance(detail, str) and words in detail, (case, detail)
        good = _post(client, cell_paths[0])
        assert good.status_code == 200 and good.json()["label"] in good.json()["probabilities"]


def test_client_file_names_are_never_opened(client, cell_paths, tmp_path):
    real = cell_paths[0]
    # The name of a real image with other bytes: the bytes are read, so this fails; the file is not opened.
    r = client.post("/v1/predict", files={"file": (str(real), b"not an image", "image/tiff")})
    assert r.status_code == 422 and "not a recognised image format" in r.json()["detail"]
    # Path-like names are only echoed back.
    ref = _post(client, real).json()
    for name in ("../../../../etc/passwd", "/etc/shadow", "C:\\Windows\\win.ini", str(tmp_path / "x.tif")):
        got = client.post("/v1/predict", files={"file": (name, real.read_bytes(), "image/tiff")}).json()
        assert got["probabilities"] == ref["probabilities"]
        assert got["filename"] in (name, name.rsplit("\\", 1)[-1])  # python-multipart strips Windows folders
    assert not (tmp_path / "x.tif").exists()


def test_live_server_refuses_oversized_upload_and_keeps_serving(live_server, cell_paths):
    import httpx

    big = b"\x00" * 4_000_000
    with httpx.Client(base_url=live_server, timeout=30) as c:
        try:
            r = c.post("/v1/predict", files={"file": ("big.tif", big, "image/tiff")})
            assert r.status_code == 413 and "this server's limit of 3,000,000 bytes" in r.json()["detail"]
        except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
            pass  # the server may answer and close before the client has finished sending; either way it refused
    with httpx.Client(base_url=live_server, timeout=30) as c:
        r = c.post("/v1/predict", files={"file": (cell_paths[0].name, cell_paths[0].read_bytes(), "image/tiff")})
        assert r.status_code == 200 and r.json()["backend"] == "onnx"
        assert c.get("/health").json()["status"] == "ok"


def test_one_pixel_image(client):
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 100, 150)).save(buf, format="PNG")
    r = client.post("/v1/predict", files={"file": ("dot.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200 and abs(sum(r.json()["probabilities"].values()) - 1) < 1e-5
    assert [w["code"] for w in r.json()["warnings"]] == ["cell_size"]  # answered, with a reason not to trust it
    r = client.post("/v1/explain", files={"file": ("dot.png", buf.getvalue(), "image/png")})
    assert r.status_code == 422 and "too small to explain" in r.json()["detail"]
    r = client.post("/v1/scan", files={"file": ("dot.png", buf.getvalue(), "image/png")})
    assert r.status_code == 422 and "too small to segment" in r.json()["detail"]
    assert client.get("/health").json()["status"] == "ok"


def test_int8_network_is_served_and_named_in_answers_and_audit(served_models, cell_paths, tmp_path):
    from fastapi.testclient import TestClient

    from leukoscope.models import load_model
    from leukoscope.models.modeldir import SHIPPED_DIR
    from leukoscope.serve import ServeConfig, create_app

    fast = load_model(SHIPPED_DIR / "leukemia-cell", backend="int8")  # the shipped model carries its int8 network
    app = create_app({"main": load_model(SHIPPED_DIR / "leukemia-cell"), "fast": fast},
                     ServeConfig(audit_db=tmp_path / "audit.sqlite"))
    with TestClient(app) as client:
        listed = {m["name"]: m["backend"] for m in client.get("/v1/models").json()}
        assert listed == {"main": "onnx", "fast": "onnx-int8"}
        for path in cell_paths:
            ref = _post(client, path).json()
            got = _post(client, path, model="fast").json()
            assert got["backend"] == "onnx-int8" and ref["backend"] == "onnx"
            assert got["probabilities"] != ref["probabilities"]  # another network ...
            for c in fast.classes:  # ... that answers close to the float32 one on these cells
                assert abs(got["probabilities"][c] - ref["probabilities"][c]) < 0.15
        row = app.state.leukoscope.audit.entries(limit=1)[0]
        assert row["model"] == "fast" and row["backend"] == "onnx-int8"


def test_tta_server_names_it_and_answers_as_the_library(cell_paths, tmp_path):
    from fastapi.testclient import TestClient

    from leukoscope.models import load_model
    from leukoscope.models.modeldir import SHIPPED_DIR
    from leukoscope.serve import ServeConfig, create_app

    app = create_app([str(SHIPPED_DIR / "leukemia-cell")], ServeConfig(audit_db=tmp_path / "audit.sqlite"), tta=True)
    ref = load_model(SHIPPED_DIR / "leukemia-cell", tta=True).predict_arrays([read_image(p) for p in cell_paths])
    with TestClient(app) as client:
        for path, p_ref in zip(cell_paths, ref, strict=True):
            got = _post(client, path).json()
            assert got["backend"] == "onnx+tta"
            np.testing.assert_allclose([got["probabilities"][c] for c in ("healthy", "leukemic")], p_ref, atol=1e-5)


def test_serve_defaults_to_every_shipped_image_model():
    from leukoscope.models.modeldir import SHIPPED_DIR, model_kind, shipped_models
    from leukoscope.serve.app import default_models

    names = default_models()
    assert names[0] == "leukemia-cell"
    assert set(names) == {n for n in shipped_models() if model_kind(SHIPPED_DIR / n) == "image"}
    assert {"all-subtype", "cell-type"} <= set(names) and "apl" not in names and "flow-aml" not in names


def test_flow_endpoint_matches_the_library_and_refuses_what_it_cannot_read(client):
    """The shipped flow model over the API: one FCS file in, the same probabilities as leukoscope.flow out."""
    from leukoscope.flow.data import flow_data_root
    from leukoscope.flow.model import load_flow_model, predict_files
    from leukoscope.models.modeldir import SHIPPED_DIR

    fcs = flow_data_root() / "flowcap2_aml_cytodx_fcs/sample12.fcs"
    r = client.post("/v1/flow", files={"file": ("s12.fcs", fcs.read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    got = r.json()
    (row,), errors = predict_files(load_flow_model(SHIPPED_DIR / "flow-aml"), [fcs])
    assert errors == [] and got["label"] == row["label"] and got["model"] == "flow-aml"
    assert got["probabilities"] == pytest.approx({k: row[f"p_{k}"] for k in ("normal", "aml")}, abs=1e-9)
    assert got["audit_id"] > 0 and len(got["weights_sha256"]) == 64 and got["filename"] == "s12.fcs"
    bad = client.post("/v1/flow", files={"file": ("x.fcs", b"not an fcs file", "application/octet-stream")})
    assert bad.status_code == 422 and "cannot read 'x.fcs' as FCS" in bad.json()["detail"]
    other = client.post("/v1/flow", data={"model": "flow-amll"},
                        files={"file": ("s12.fcs", fcs.read_bytes(), "application/octet-stream")})
    assert other.status_code == 404 and "Did you mean 'flow-aml'" in other.json()["detail"]


def test_diagnose_endpoint_matches_the_library(client, data_root):
    """One patient's cells over the API give what leukoscope.diagnose gives for the same cells."""
    from leukoscope.diagnose.core import Diagnoser

    src = data_root / "aml_multiclass" / "Data" / "All" / "Patient_00"
    cells = sorted(q for q in src.rglob("*") if q.suffix.lower() in (".jpg", ".png"))[:6]
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in cells]
    files.append(("files", ("broken.jpg", b"not an image", "image/jpeg")))
    r = client.post("/v1/diagnose", data={"patient": "P0"}, files=files)
    assert r.status_code == 200, r.text
    got = r.json()
    ref = Diagnoser("apl").diagnose_images("P0", [read_image(p) for p in cells])
    assert got["label"] == ref.label and got["n_cells"] == 6 and got["model"] == "apl"
    assert got["probabilities"]["APL"] == pytest.approx(ref.p_apl, abs=1e-4)
    assert sum(got["cell_type_counts"].values()) == 6
    assert [s["file"] for s in got["skipped"]] == ["broken.jpg"]
    none = client.post("/v1/diagnose", files=[("files", ("b.jpg", b"junk", "image/jpeg"))])
    assert none.status_code == 422

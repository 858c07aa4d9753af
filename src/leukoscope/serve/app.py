"""The REST API and the lab's web page, in one FastAPI app.

    from leukoscope.serve import ServeConfig, create_app
    app = create_app(["leukemia-cell"], ServeConfig(audit_db="audit.sqlite"))
    # uvicorn.run(app, host="127.0.0.1", port=8000)   or: leukoscope serve

Endpoints: ``POST /v1/predict``, ``POST /v1/explain``, ``POST /v1/scan`` (multipart upload, field ``file``; the model
is chosen with ``?model=`` or a ``model`` form field), ``GET /v1/models``, ``GET /health``, the page at ``GET /`` and
the OpenAPI docs at ``/docs``. Models are loaded once and shared by all requests (``LoadedModel`` is thread-safe);
the blocking work runs in the thread pool so the event loop keeps answering. Bad input gets a 4xx with
``{"detail": "..."}``; no client-supplied name is ever used as a path. Every answer is in the audit log before it is
sent.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leukoscope.errors import require

require("fastapi", "serve", "the web server")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile  # noqa: E402
from fastapi.concurrency import run_in_threadpool  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import FileResponse, JSONResponse  # noqa: E402
from fastapi.staticfiles import StaticFiles  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from leukoscope import __version__  # noqa: E402
from leukoscope._registry import unknown_name_message  # noqa: E402
from leukoscope.data.images import read_image  # noqa: E402
from leukoscope.errors import ImageReadError  # noqa: E402
from leukoscope.models.modeldir import LoadedModel, load_model, resolve_model_dir  # noqa: E402
from leukoscope.serve.audit import AuditLog, sha256_bytes  # noqa: E402

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Images up to this side come back as lossless PNG at full size; larger ones (whole fields) as JPEG, downscaled.
PNG_MAX_SIDE = 1024
JPEG_MAX_SIDE = 1600
# Explanation methods the API offers: one backward pass each. Score-CAM and occlusion cost hundreds of forward passes
# per image, enough for one client to stall the server, so they stay on the command line.
API_METHODS = ("gradcam", "gradcam++", "layercam")
_UPLOAD_TYPES = ("image/", "application/octet-stream")
FLOW_MODEL = "flow-aml"
PATIENT_MODEL = "apl"
# Content-Security-Policy of the page: everything from this app, nothing from anywhere else.
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of the server.

    Attributes:
        audit_db: the SQLite audit log (created when missing).
        store_images: keep every uploaded image in this folder (named by SHA-256); None stores none.
        max_upload_bytes: larger request bodies get 413 before they are parsed.
        max_pixels: larger images (width x height) get 422 before they are decoded.
        log_client: record the client's address in the audit log.
        explain_methods: the explanation methods ``/v1/explain`` accepts.
        onnx_threads: ONNX Runtime threads per request, without spin-waiting (see
            ``LoadedModel.set_onnx_threads``); 0 keeps the session :func:`leukoscope.models.load_model` made.
        flow_models: the flow cytometry models ``/v1/flow`` answers with (shipped names or directories); each is
            loaded on its first request.
        patient_models: the patient models ``/v1/diagnose`` answers with (loaded on their first request).
    """

    audit_db: str | Path = "leukoscope-audit.sqlite"
    store_images: str | Path | None = None
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 25_000_000
    log_client: bool = False
    explain_methods: tuple[str, ...] = API_METHODS
    onnx_threads: int = 1
    flow_models: tuple[str, ...] = ("flow-aml",)
    patient_models: tuple[str, ...] = ("apl",)

    def __post_init__(self) -> None:
        if self.max_upload_bytes <= 0:
            raise ValueError(f"max_upload_bytes must be positive, got {self.max_upload_bytes}")
        if self.max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.onnx_threads < 0:
            raise ValueError(f"onnx_threads must be 0 (library default) or more, got {self.onnx_threads}")


# ----------------------------------------------------------------------------------------------------------------
# Response schemas (they make the OpenAPI docs)
# ----------------------------------------------------------------------------------------------------------------
class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong, naming what was received")


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "no file field, two different models asked for, unknown method"},
    404: {"model": ErrorResponse, "description": "unknown model (the message lists the served ones)"},
    413: {"model": ErrorResponse, "description": "request body above the server's limit"},
    415: {"model": ErrorResponse, "description": "not a multipart/form-data upload, or a file part that is no image"},
    422: {"model": ErrorResponse, "description": "unreadable image (empty, truncated, not an image, too many pixels) "
                                                 "or an invalid form value"},
}


class EncodedImage(BaseModel):
    media_type: str = Field(description="image/png (lossless, full size) or image/jpeg (large images, downscaled)")
    data: str = Field(description="the image file, base64")
    width: int
    height: int


class QualityWarningOut(BaseModel):
    code: str = Field(description="out_of_focus, overexposed, underexposed, stain, cell_size, whole_field, ...")
    message: str


class _Answer(BaseModel):
    """What every single-input answer starts with: the class, its probability, every class's, and who gave them."""

    label: str = Field(description="the most probable class")
    confidence: float = Field(description="calibrated probability of that class")
    probabilities: dict[str, float] = Field(description="calibrated probability of every class")
    model: str
    weights_sha256: str


class PredictResponse(_Answer):
    backend: str = Field(description="what computed it: onnx, onnx-int8 or torch; +tta with test-time flips")
    filename: str = Field(description="the uploaded file's name, echoed (never used as a path)")
    sha256: str = Field(description="SHA-256 of the uploaded bytes")
    image_size: list[int] = Field(description="[width, height] in pixels")
    audit_id: int = Field(description="the row of this answer in the audit log")
    image: EncodedImage | None = Field(None, description="the decoded input, when include_image was set")
    ood: bool | None = Field(None, description="true when the image is unlike the model's training images: the "
                             "class is given but not to be trusted (null when the model has no detector)")
    ood_score: float | None = Field(None, description="the out-of-distribution score (higher is more unusual)")
    ood_threshold: float | None = Field(None, description="the score above which an image is flagged")
    warnings: list[QualityWarningOut] = Field(default_factory=list, description="image-quality warnings")


class ExplainResponse(PredictResponse):
    explained_class: str
    method: str
    target_layer: str
    hottest_region: dict[str, Any]
    faithfulness: dict[str, Any] = Field(
        default_factory=dict, description="what the model's faithfulness record says of the method on this kind of "
        "image (`kind`: cutout = a cell on black, smear): verdict (passes / fails / inconclusive / not measured) "
        "against a random map, each measured image set's result, and a note for the reader")
    overlay: EncodedImage = Field(description="the heatmap blended on the image, same size as the image")
    heatmap: EncodedImage = Field(description="the heatmap alone, 8-bit grayscale PNG (255 = peak)")
    figure: EncodedImage = Field(description="the overlay with a caption and a colour bar, for a report")


class ScanResponse(BaseModel):
    model: str
    weights_sha256: str
    backend: str
    filename: str
    sha256: str
    image_size: list[int]
    audit_id: int
    white_cells: int
    abnormal_cells: int
    abnormal_share: float | None
    abnormal_cells_ci95: list[int] = Field(description="95% interval of the abnormal count, given each counted "
                                           "cell's probability of being abnormal")
    abnormal_share_ci95: list[float] | None = Field(None, description="95% Wilson interval of the abnormal share of "
                                                    "white cells (null without white cells)")
    label_counts: dict[str, int]
    detection: dict[str, Any] = Field(description="the white-cell detector (learned / classical), the working scale "
                                      "and the detection settings")
    partial_cells: int = Field(description="cells cut by the field's edge: listed in cells, not counted")
    ood_cells: int | None = Field(None, description="counted cells unlike the model's training cells (their class "
                                  "is not to be trusted); null when the model has no detector")
    warnings: list[QualityWarningOut] = Field(default_factory=list, description="the field's image-quality warnings")
    cells: list[dict[str, Any]] = Field(description="one per white cell: bbox [x0, y0, x1, y1] in image pixels, "
                                                    "label, confidence, p_<class>, abnormal, partial, ...")
    result: dict[str, Any] = Field(description="everything leukoscope.scan reports for the field")
    overlay: EncodedImage = Field(description="the field with every cell boxed in its class colour")
    image: EncodedImage | None = None


class FlowResponse(_Answer):
    filename: str
    sha256: str
    audit_id: int


class DiagnoseResponse(BaseModel):
    patient: str
    label: str = Field(description="AML or APL for the shipped apl model")
    probabilities: dict[str, float] = Field(description="P(AML) and P(APL) of the patient")
    n_cells: int = Field(description="cells read and used")
    skipped: list[dict[str, str]] = Field(description="uploads that could not be read as images, with the reason")
    cell_type_counts: dict[str, int] = Field(description="differential count: each cell's most probable type")
    ood_share: float | None = Field(None, description="share of the cells unlike the cell-type model's training "
                                    "cells: the higher, the less the diagnosis is to be trusted")
    model: str
    audit_id: int


class ModelInfo(BaseModel):
    name: str
    classes: list[str]
    backend: str
    input_size: int
    weights_sha256: str
    default: bool
    info: dict[str, Any] = Field(description="model.json")
    metrics: dict[str, Any] | None = Field(description="metrics.json: what it reached on held-out groups")
    card: str | None = Field(description="MODEL_CARD.md (markdown)")


class Health(BaseModel):
    status: str
    version: str
    models: list[str]
    default_model: str
    uptime_s: float
    audit_entries: int


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
def default_models() -> list[str]:
    """Every shipped model that answers for one image (kind ``image``), the default model first. The flow cytometry
    model (``flow-aml``) answers on ``/v1/flow`` (one FCS file), the patient model (``apl``) on ``/v1/diagnose``
    (a set of one patient's cells)."""
    from leukoscope.models.modeldir import DEFAULT_MODEL, SHIPPED_DIR, model_kind, shipped_models

    names = [n for n in shipped_models() if model_kind(SHIPPED_DIR / n) == "image"]
    return sorted(names, key=lambda n: (n != DEFAULT_MODEL, n))


def load_models(specs: Sequence[str | Path | LoadedModel] | Mapping[str, LoadedModel] | None,
                backend: str = "auto", tta: bool = False) -> dict[str, LoadedModel]:
    """Models by the name clients select them with; the first is the default.

    Args:
        specs: shipped names, model directories or loaded models (default: :func:`default_models`, every shipped
            image model, ``leukemia-cell`` first); a mapping gives the names explicitly.
        backend: ``auto``, ``onnx``, ``int8`` or ``torch`` for models loaded here.
        tta: models loaded here predict with test-time flips (``LoadedModel.tta``).
    """
    if isinstance(specs, Mapping):
        if not specs:
            raise ValueError("no models to serve")
        return dict(specs)
    out: dict[str, LoadedModel] = {}
    for spec in specs or default_models():
        if isinstance(spec, LoadedModel):
            model, name = spec, spec.name
        else:
            model = load_model(spec, backend=backend, tta=tta)
            shipped = spec is None or not Path(str(spec)).expanduser().is_dir()
            name = str(spec or resolve_model_dir(None).name) if shipped else (model.name or model.path.name)
        if name in out:
            raise ValueError(f"two models are called {name!r} ({out[name].path} and {model.path}); serve one of "
                             f"them, or rename one in its model.json")
        out[name] = model
    return out


def _read_json(path: Path) -> dict | None:
    """A model directory's optional JSON file (metrics), None when it has none or it cannot be read (logged)."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("not serving %s: %s", path, exc)
        return None


def _read_text(path: Path) -> str | None:
    """A model directory's optional text file (the model card), None when it has none or it cannot be read."""
    if not path.exists():
        return None
    try:
        return path.read_text()
    except OSError as exc:
        log.warning("not serving %s: %s", path, exc)
        return None


# ----------------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------------
def encode_image(rgb: np.ndarray) -> dict[str, Any]:
    """RGB (or grayscale) uint8 -> ``{media_type, data (base64), width, height}``: PNG at full size up to
    ``PNG_MAX_SIDE``, else JPEG (quality 90) downscaled to ``JPEG_MAX_SIDE``."""
    h, w = rgb.shape[:2]
    bgr = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    if max(h, w) <= PNG_MAX_SIDE:
        ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr), [cv2.IMWRITE_PNG_COMPRESSION, 1])
        media = "image/png"
    else:
        s = JPEG_MAX_SIDE / max(h, w)
        if s < 1:
            w, h = max(1, round(w * s)), max(1, round(h * s))
            bgr = cv2.resize(np.ascontiguousarray(bgr), (w, h), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, 90])
        media = "image/jpeg"
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 array
        raise RuntimeError(f"could not encode a {w}x{h} image")
    return {"media_type": media, "data": base64.b64encode(buf.tobytes()).decode("ascii"), "width": w, "height": h}


# ----------------------------------------------------------------------------------------------------------------
# Request body limit (pure ASGI: it sees the body before anything parses it)
# ----------------------------------------------------------------------------------------------------------------
class BodyLimitMiddleware:
    """Refuses request bodies above ``max_bytes`` with 413: at once when Content-Length says so, else as soon as the
    streamed body passes the limit (chunked uploads, lying headers)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, n: int | None) -> str:
        got = f"request body is {n:,} bytes, above" if n is not None else "request body exceeds"
        return f"{got} this server's limit of {self.max_bytes:,} bytes (leukoscope serve --max-upload-mb)"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await JSONResponse({"detail": f"invalid Content-Length header {length[:40]!r}"}, 400)(
                    scope, receive, send)
                return
            if n > self.max_bytes:
                await JSONResponse({"detail": self._message(n)}, 413, headers={"Connection": "close"})(
                    scope, receive, send)
                return
        received = 0

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through the form parser and becomes a 413 answer.
                    raise HTTPException(413, self._message(None))
            return message

        await self.app(scope, limited_receive, send)


class SecurityHeadersMiddleware:
    """``nosniff`` on everything; the page's Content-Security-Policy on HTML."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                headers.append((b"x-content-type-options", b"nosniff"))
                ctype = dict(headers).get(b"content-type", b"")
                if ctype.startswith(b"text/html"):
                    headers.append((b"content-security-policy", CSP.encode()))
                    headers.append((b"referrer-policy", b"no-referrer"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# ----------------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------------
def _cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass
class _State:
    models: dict[str, LoadedModel]
    config: ServeConfig
    audit: AuditLog
    started: float = field(default_factory=time.monotonic)
    model_infos: dict[str, dict] = field(default_factory=dict)
    # Grad-CAM holds the model's lock, so explanations of one model run one at a time anyway; running them on one
    # thread per model also keeps PyTorch's autograd memory in one allocator arena instead of one per pool thread.
    explain_pools: dict[str, ThreadPoolExecutor] = field(default_factory=dict)
    # Predictions run on one thread per core plus one (a request waiting for the audit log's fsync leaves its core to
    # the next), in arrival order: eight requests sharing two cores each took eight times as long and finished in a
    # random order (p95 latency 1.5x the mean); queued first-come first-served, each runs at full speed.
    predict_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(_cores() + 1, thread_name_prefix="predict"))

    flow_models: dict[str, tuple[Any, str]] = field(default_factory=dict)  # (model, weights sha), on first use
    diagnosers: dict[str, Any] = field(default_factory=dict)  # patient models, loaded on first use
    load_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def default(self) -> str:
        return next(iter(self.models))


@dataclass(frozen=True)
class _Upload:
    data: bytes
    filename: str
    sha256: str


def create_app(models: Sequence[str | Path | LoadedModel] | Mapping[str, LoadedModel] | None = None,
               config: ServeConfig | None = None, backend: str = "auto", tta: bool = False) -> FastAPI:
    """The FastAPI app serving ``models`` (see :func:`load_models`; the first is the default).

    ONNX Runtime sessions of the models are re-opened for serving (``LoadedModel.set_onnx_threads`` with
    ``config.onnx_threads``).
    """
    cfg = config or ServeConfig()
    loaded = load_models(models, backend, tta)
    state = _State(loaded, cfg, AuditLog(cfg.audit_db, cfg.store_images))
    for name, m in loaded.items():
        m.set_onnx_threads(cfg.onnx_threads)
        state.explain_pools[name] = ThreadPoolExecutor(1, thread_name_prefix=f"explain-{name}")
        state.model_infos[name] = {
            "name": name, "classes": list(m.classes), "backend": m.engine, "input_size": int(m.input_size),
            "weights_sha256": str(m.info.get("weights_sha256", "")), "default": name == state.default, "info": m.info,
            "metrics": _read_json(m.path / "metrics.json"), "card": _read_text(m.path / "MODEL_CARD.md")}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        for pool in [*state.explain_pools.values(), state.predict_pool]:
            pool.shutdown(wait=True)
        state.audit.close()

    app = FastAPI(
        lifespan=lifespan,
        docs_url=None,  # FastAPI's Swagger UI and ReDoc load from a CDN; /docs is served from static/ instead
        redoc_url=None,
        title="leukoscope",
        version=__version__,
        description="Finds leukemia in microscope images of peripheral blood smears and explains what it saw. "
                    "Research use and a second reader for trained staff; not a medical device.",
    )
    app.state.leukoscope = state
    app.add_middleware(BodyLimitMiddleware, max_bytes=cfg.max_upload_bytes)
    app.add_middleware(SecurityHeadersMiddleware)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else str(e.get("msg", "invalid")))
        return JSONResponse({"detail": "invalid request: " + "; ".join(parts)}, 422)

    @app.exception_handler(ImageReadError)
    async def _unreadable(_: Request, exc: ImageReadError) -> JSONResponse:
        return JSONResponse({"detail": f"cannot read the uploaded image {exc.path!r}: {exc.reason}"}, 422)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server log has the details"},
                            500)

    def pick_model(query: str | None, form: str | None) -> tuple[str, LoadedModel]:
        if query and form and query != form:
            raise HTTPException(400, f"two different models asked for: ?model={query!r} and form field "
                                     f"model={form!r}")
        name = query or form or state.default
        if name not in state.models:
            raise HTTPException(404, unknown_name_message("model", name, list(state.models)))
        return name, state.models[name]

    async def read_upload(request: Request, file: UploadFile | None, what: str = "the image") -> _Upload:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise HTTPException(415, f"expected a multipart/form-data upload with the image in the field 'file', "
                                     f"got content type {ctype[:80]!r}")
        if file is None:
            raise HTTPException(400, f"no file in the upload: send {what} in the multipart field 'file'")
        name = (file.filename or "upload")[-200:]
        part_type = (file.content_type or "").lower()
        if part_type and not part_type.startswith(_UPLOAD_TYPES):
            raise HTTPException(415, f"the uploaded file {name!r} has content type {part_type[:80]!r}; send an image "
                                     f"(image/png, image/jpeg, image/tiff, image/bmp) or application/octet-stream")
        data = await file.read()
        return _Upload(data, name, sha256_bytes(data))

    def decode(up: _Upload) -> np.ndarray:
        # The name only labels error messages: read_image gets the bytes, never a path.
        return read_image(up.data, name=up.filename, max_pixels=cfg.max_pixels)

    def audit(endpoint: str, name: str, model: LoadedModel, up: _Upload, outputs: dict, request: Request) -> int:
        client = request.client.host if cfg.log_client and request.client else None
        return state.audit.append(endpoint=endpoint, model=name, weights_sha256=str(model.info.get("weights_sha256",
                                  "")), input_sha256=up.sha256, outputs=outputs, backend=model.engine,
                                  input_bytes=len(up.data), client=client,
                                  image=up.data if cfg.store_images else None)

    def with_ood_threshold(model: LoadedModel, out: dict[str, Any]) -> dict[str, Any]:
        out["ood_threshold"] = None if model.ood is None else float(model.ood.threshold)
        return out

    def base(name: str, model: LoadedModel, up: _Upload, rgb: np.ndarray) -> dict[str, Any]:
        return {"model": name, "weights_sha256": str(model.info.get("weights_sha256", "")), "backend": model.engine,
                "filename": up.filename, "sha256": up.sha256, "image_size": [int(rgb.shape[1]), int(rgb.shape[0])]}

    # ------------------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    @app.get("/health", response_model=Health, tags=["service"], summary="Liveness")
    async def health() -> dict:
        """Liveness: the models served and how long the server has been up."""
        n = await run_in_threadpool(state.audit.count)
        return {"status": "ok", "version": __version__, "models": list(state.models), "default_model": state.default,
                "uptime_s": round(time.monotonic() - state.started, 3), "audit_entries": n}

    @app.get("/v1/models", response_model=list[ModelInfo], tags=["models"], summary="The models served")
    async def models_() -> list[dict]:
        """The models served: classes, backend, weights hash, held-out metrics and the model card."""
        return list(state.model_infos.values())

    @app.post("/v1/predict", response_model=PredictResponse, tags=["inference"], responses=_ERRORS,
              summary="Classify one cell image")
    async def predict(request: Request,
                      file: UploadFile | None = File(None, description="the image (PNG, JPEG, TIFF or BMP)"),
                      model: str | None = Form(None, description="model name (default: the first served)"),
                      model_q: str | None = Query(None, alias="model", description="model name, as a query"),
                      include_image: bool = Form(False, description="also return the decoded image (for the page)"),
                      ) -> dict:
        """Classify one cell image: label, calibrated confidence and every class's probability, exactly as
        ``leukoscope predict`` gives them for the same file."""
        name, m = pick_model(model_q, model)
        up = await read_upload(request, file)

        def work() -> dict:
            from leukoscope.predict import predict as predict_image

            rgb = decode(up)
            out = with_ood_threshold(m, predict_image(rgb, m).to_dict())
            out.pop("path")
            res = base(name, m, up, rgb) | out
            res["audit_id"] = audit("predict", name, m, up, out, request)
            if include_image:
                res["image"] = encode_image(rgb)
            return res

        return await asyncio.get_running_loop().run_in_executor(state.predict_pool, work)

    @app.post("/v1/explain", response_model=ExplainResponse, tags=["inference"], responses=_ERRORS,
              summary="Classify one cell image and show where the model looked")
    async def explain_(request: Request,
                       file: UploadFile | None = File(None, description="the image (PNG, JPEG, TIFF or BMP)"),
                       model: str | None = Form(None, description="model name (default: the first served)"),
                       model_q: str | None = Query(None, alias="model", description="model name, as a query"),
                       method: str = Form("gradcam", description=f"one of {list(API_METHODS)}"),
                       include_image: bool = Form(False, description="also return the decoded image (for the page)"),
                       ) -> dict:
        """The prediction plus where the model looked: a Grad-CAM heatmap, blended on the image (``overlay``), alone
        (``heatmap``) and as a captioned figure with a colour bar (``figure``), each a base64 image."""
        from leukoscope.explain import explain
        from leukoscope.explain.overlay import blend

        name, m = pick_model(model_q, model)
        if method not in cfg.explain_methods:
            raise HTTPException(400, unknown_name_message("explanation method", method, list(cfg.explain_methods)))
        up = await read_upload(request, file)

        def work() -> dict:
            rgb = decode(up)
            try:
                e = explain(rgb, model=m, method=method)
            except ValueError as exc:  # e.g. an image too small to explain
                raise HTTPException(422, f"cannot explain {up.filename!r}: {exc}") from exc
            out = with_ood_threshold(m, {
                "label": e.label, "confidence": e.confidence, "probabilities": e.probabilities,
                "explained_class": e.explained_class, "method": e.method, "target_layer": e.target_layer,
                "hottest_region": e.region, "faithfulness": e.faithfulness, "ood": e.ood, "ood_score": e.ood_score,
                "warnings": [{"code": c, "message": t} for c, t in e.warnings]})
            res = base(name, m, up, rgb) | out
            res["audit_id"] = audit("explain", name, m, up, out, request)
            res["overlay"] = encode_image(blend(rgb, e.heatmap))
            res["heatmap"] = encode_image(np.round(e.heatmap * 255).astype(np.uint8))
            res["figure"] = encode_image(e.overlay)
            if include_image:
                res["image"] = encode_image(rgb)
            return res

        return await asyncio.get_running_loop().run_in_executor(state.explain_pools[name], work)

    @app.post("/v1/flow", response_model=FlowResponse, tags=["inference"], responses={**_ERRORS, 501: {
        "model": ErrorResponse, "description": "the flow cytometry extra is not installed"}},
              summary="Normal vs AML from one flow cytometry FCS file")
    async def flow(request: Request, file: UploadFile | None = File(None, description="one subject's FCS file"),
                   model: str = Form(FLOW_MODEL, description="a shipped flow model or a flow model directory "
                                                             "given to the server")) -> dict:
        """One subject's FCS file (the panel the model was trained on) -> class probabilities from the flow
        cytometry SVM (``leukoscope flow predict`` does the same for many files)."""
        if model not in cfg.flow_models:
            raise HTTPException(404, unknown_name_message("flow model", model, list(cfg.flow_models)))
        up = await read_upload(request, file, what="an FCS file")

        def work() -> dict:
            import tempfile

            try:
                from leukoscope.flow.model import load_flow_model, predict_files
            except ImportError as exc:
                raise HTTPException(501, f"flow cytometry is not available in this installation ({exc}); "
                                         "pip install 'leukoscope[flow]'") from exc
            with state.load_lock:
                if model not in state.flow_models:
                    from leukoscope.models.modeldir import file_sha256, resolve_model_dir

                    d = resolve_model_dir(model)
                    weights = d / "model.safetensors"
                    state.flow_models[model] = (load_flow_model(d),
                                                file_sha256(weights) if weights.exists() else "")
            fm, sha = state.flow_models[model]
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "upload.fcs"  # the readers take a path; the client's name never becomes one
                path.write_bytes(up.data)
                try:
                    rows, errors = predict_files(fm, [path])
                except ValueError as exc:
                    raise HTTPException(422, f"cannot use {model!r} on one FCS file: {exc}") from exc
            if errors:
                raise HTTPException(422, f"cannot read {up.filename!r} as FCS: {errors[0][1]}")
            row = rows[0]
            probs = {c: row[f"p_{c}"] for c in fm.classes}
            out = {"label": row["label"], "confidence": row["confidence"], "probabilities": probs}
            client = request.client.host if cfg.log_client and request.client else None
            audit_id = state.audit.append(endpoint="flow", model=model, weights_sha256=sha, input_sha256=up.sha256,
                                          outputs=out, backend="sklearn", input_bytes=len(up.data), client=client,
                                          image=None)
            return out | {"model": model, "weights_sha256": sha, "filename": up.filename, "sha256": up.sha256,
                          "audit_id": audit_id}

        return await run_in_threadpool(work)

    @app.post("/v1/diagnose", response_model=DiagnoseResponse, tags=["inference"], responses=_ERRORS,
              summary="AML vs APL for one patient from a set of cell images")
    async def diagnose(request: Request,
                       files: list[UploadFile] = File(..., description="one patient's cell images (repeat 'files')"),
                       patient: str = Form("patient", max_length=200, description="a name for the report"),
                       model: str = Form(PATIENT_MODEL, description="a shipped patient model")) -> dict:
        """One patient's cells -> P(AML), P(APL), the differential count and the share of unusual cells, as
        ``leukoscope diagnose`` gives for a folder. Unreadable uploads are listed in ``skipped``."""
        if model not in cfg.patient_models:
            raise HTTPException(404, unknown_name_message("patient model", model, list(cfg.patient_models)))
        ups = [await read_upload(request, f, what="the cell images") for f in files]

        def work() -> dict:
            images, skipped = [], []
            for up in ups:
                try:
                    images.append(decode(up))
                except ImageReadError as exc:
                    skipped.append({"file": up.filename, "reason": exc.reason})
            if not images:
                raise HTTPException(422, f"none of the {len(ups)} uploads could be read as a cell image")
            with state.load_lock:
                if model not in state.diagnosers:
                    from leukoscope.diagnose.core import Diagnoser

                    state.diagnosers[model] = Diagnoser(model)
                diagnoser = state.diagnosers[model]
                r = diagnoser.diagnose_images(patient, images)
            types = r.cell_types
            counts = {t: int(n) for t, n in zip(types, np.bincount(r.cell_proba.argmax(1), minlength=len(types)),
                                                 strict=True)}
            out = {"patient": patient, "label": r.label, "probabilities": {"AML": r.p_aml, "APL": r.p_apl},
                   "n_cells": r.n_cells, "skipped": skipped, "cell_type_counts": counts, "ood_share": r.ood_share}
            client = request.client.host if cfg.log_client and request.client else None
            joint = sha256_bytes("".join(up.sha256 for up in ups).encode())
            audit_id = state.audit.append(
                endpoint="diagnose", model=model, weights_sha256=str(diagnoser.model.info.get("weights_sha256", "")),
                input_sha256=joint, outputs=out, backend="torch", input_bytes=sum(len(up.data) for up in ups),
                client=client, image=None)
            return out | {"model": model, "audit_id": audit_id}

        return await run_in_threadpool(work)

    @app.post("/v1/scan", response_model=ScanResponse, tags=["inference"], responses={**_ERRORS, 501: {
              "model": ErrorResponse, "description": "scanning not available"}},
              summary="Find, classify and box every white cell of a whole field")
    async def scan(request: Request,
                   file: UploadFile | None = File(None, description="a whole smear field (PNG, JPEG, TIFF or BMP)"),
                   model: str | None = Form(None, description="model name (default: the first served)"),
                   model_q: str | None = Query(None, alias="model", description="model name, as a query"),
                   gradcam: bool = Form(False, description="blend Grad-CAM into the abnormal cells of the overlay"),
                   abnormal_threshold: float | None = Form(None, ge=0.0, le=1.0,
                                                           description="a cell is abnormal from this probability on "
                                                                       "(default: the model's operating point)"),
                   include_image: bool = Form(False, description="also return the decoded image (for the page)"),
                   ) -> dict:
        """Find every white cell of a whole field, classify it and flag the abnormal ones: one entry per cell with its
        box (field pixels), label and confidence, the totals, and the field with the boxes drawn."""
        try:
            from leukoscope.scan import ScanConfig, render_field_overlay, scan_field
        except ImportError as exc:  # pragma: no cover - scanning ships with the package
            raise HTTPException(501, f"whole-field scanning is not available in this installation ({exc})") from exc
        name, m = pick_model(model_q, model)
        up = await read_upload(request, file)

        def work() -> dict:
            rgb = decode(up)
            try:
                result = scan_field(rgb, m, ScanConfig(gradcam=gradcam, abnormal_threshold=abnormal_threshold))
            except ValueError as exc:
                raise HTTPException(422, f"cannot scan {up.filename!r}: {exc}") from exc
            d = result.to_dict(up.filename)
            out = {k: d[k] for k in ("white_cells", "abnormal_cells", "abnormal_share", "abnormal_cells_ci95",
                                     "abnormal_share_ci95", "label_counts", "partial_cells", "ood_cells", "warnings",
                                     "cells", "detection")}
            res = base(name, m, up, rgb) | out
            res["result"] = d
            res["audit_id"] = audit("scan", name, m, up, out, request)
            res["overlay"] = encode_image(render_field_overlay(rgb, result))
            if include_image:
                res["image"] = encode_image(rgb)
            return res

        return await run_in_threadpool(work)

    return app

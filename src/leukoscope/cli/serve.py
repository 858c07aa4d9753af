"""``leukoscope serve [--model M ...] [--host 127.0.0.1] [--port 8000] [--audit-db FILE] [--store-images DIR]``:
the REST API, its OpenAPI docs (``/docs``) and the lab's web page (``/``)."""

from __future__ import annotations

import argparse
import ipaddress
import sys


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve the REST API and the web page for the lab",
                       description="Serve the REST API (/v1/predict, /v1/explain, /v1/scan, /v1/models, /health), its "
                                   "OpenAPI docs (/docs) and the web page (/). Every prediction served is appended to "
                                   "an SQLite audit log.")
    p.add_argument("--model", nargs="+", default=None, metavar="M",
                   help="shipped model names or model directories; the first is the default (default: every shipped "
                        "image model, leukemia-cell first)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the server has no log-in, so "
                        "put it behind an authenticating proxy before opening it to a network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--audit-db", default="leukoscope-audit.sqlite", metavar="FILE",
                   help="SQLite audit log, one row per prediction served (default ./leukoscope-audit.sqlite)")
    p.add_argument("--store-images", metavar="DIR", default=None,
                   help="also keep every uploaded image in DIR, named by its SHA-256 (default: images are not kept)")
    p.add_argument("--log-client", action="store_true", help="record the client's IP address in the audit log")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request body accepted (default 20)")
    p.add_argument("--max-pixels", type=int, default=25_000_000,
                   help="largest image accepted, width x height (default 25,000,000)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "int8", "torch"],
                   help="inference backend (auto: ONNX Runtime when installed)")
    p.add_argument("--tta", action="store_true",
                   help="predict from the mean logits of each image's 4 flips (4x the work; answers say +tta)")
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch threads (Grad-CAM); default: PyTorch's choice")
    p.add_argument("--onnx-threads", type=int, default=1,
                   help="ONNX Runtime threads per request, without spin-waiting (default 1: requests run side by "
                        "side; 0 keeps ONNX Runtime's defaults)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=main)
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(args: argparse.Namespace) -> int:
    from leukoscope.errors import MissingExtraError, require

    require("fastapi", "serve", "the web server")
    uvicorn = require("uvicorn", "serve", "the web server")
    try:
        require("python_multipart", "serve", "file uploads")
    except MissingExtraError:  # python-multipart before 0.0.13 names its module 'multipart'
        require("multipart", "serve", "file uploads")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from leukoscope.serve.app import ServeConfig, create_app

    cfg = ServeConfig(audit_db=args.audit_db, store_images=args.store_images, log_client=args.log_client,
                      max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels,
                      onnx_threads=args.onnx_threads)
    app = create_app(args.model, cfg, backend=args.backend, tta=args.tta)
    state = app.state.leukoscope
    for name, m in state.models.items():
        print(f"leukoscope serve: model {name} ({', '.join(m.classes)}; backend {m.engine}; "
              f"weights {str(m.info.get('weights_sha256', ''))[:12]})", file=sys.stderr)
    print(f"leukoscope serve: audit log {state.audit.path.resolve()}"
          + (f"; images kept in {cfg.store_images}" if cfg.store_images else "; images not kept"), file=sys.stderr)
    if not _is_loopback(args.host):
        print(f"leukoscope serve: WARNING listening on {args.host}: this server has no log-in and no TLS; anyone who "
              f"can reach it can use it", file=sys.stderr)
    print(f"leukoscope serve: page http://{args.host}:{args.port}/  API docs http://{args.host}:{args.port}/docs",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

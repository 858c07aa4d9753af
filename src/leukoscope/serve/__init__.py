"""Serving: the REST API, the lab's web page and the audit log (``pip install 'leukoscope[serve]'``).

    from leukoscope.serve import ServeConfig, create_app
    app = create_app(["leukemia-cell"], ServeConfig(audit_db="audit.sqlite"))

The audit log alone needs nothing beyond the standard library: ``from leukoscope.serve.audit import AuditLog``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AuditLog", "ServeConfig", "create_app", "load_models"]


def __getattr__(name: str) -> Any:  # lazy: importing the package does not need FastAPI
    if name == "AuditLog":
        from leukoscope.serve.audit import AuditLog

        return AuditLog
    if name in ("ServeConfig", "create_app", "load_models"):
        from leukoscope.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'leukoscope.serve' has no attribute {name!r}")

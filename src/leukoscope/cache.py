"""Where leukoscope keeps what it can recompute: ONNX exports of the models, cached backbone features."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str = "") -> Path:
    """``cache_dir`` when given, else ``$LEUKOSCOPE_CACHE``, else ``~/.cache/leukoscope``."""
    return Path(cache_dir or os.environ.get("LEUKOSCOPE_CACHE", Path.home() / ".cache" / "leukoscope"))

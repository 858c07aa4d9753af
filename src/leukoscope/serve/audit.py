"""The audit log: one SQLite row per prediction served, written before the answer leaves the server.

SQLite in WAL mode with ``synchronous=FULL``: every row is committed (and fsynced) on its own, so a crash or a
``kill -9`` mid-write loses at most the row being written, never an earlier one, and the database still opens.
Images are not kept unless a folder is given; then each is stored once under its SHA-256 (never under the name the
client sent).

    log = AuditLog("audit.sqlite")
    row_id = log.append(endpoint="predict", model="leukemia-cell", weights_sha256="...", input_sha256="...",
                        outputs={"label": "leukemic", ...})
    log.entries()[-1]["outputs"]["label"]
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_utc TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL,
    backend TEXT NOT NULL DEFAULT '',
    input_sha256 TEXT NOT NULL,
    input_bytes INTEGER NOT NULL DEFAULT 0,
    outputs TEXT NOT NULL,
    client TEXT,
    image_path TEXT,
    leukoscope_version TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS predictions_input ON predictions (input_sha256);
"""

# Magic bytes -> file suffix for stored images (the client's file name is never used).
_MAGIC = ((b"\x89PNG\r\n\x1a\n", ".png"), (b"\xff\xd8\xff", ".jpg"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"),
          (b"BM", ".bmp"))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image_suffix(data: bytes) -> str:
    """The suffix that matches the bytes' format (``.bin`` when unknown)."""
    for magic, suffix in _MAGIC:
        if data.startswith(magic):
            return suffix
    return ".bin"


class AuditLog:
    """Append-only log of served predictions in an SQLite file; safe to share between threads.

    Args:
        path: the SQLite file (created with its parent folders when missing).
        store_images: a folder to keep every input image in, as ``<sha256[:2]>/<sha256><suffix>``; None keeps none.
    """

    def __init__(self, path: str | Path, store_images: str | Path | None = None) -> None:
        from leukoscope import __version__

        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.store_images = Path(store_images).expanduser() if store_images else None
        if self.store_images is not None:
            self.store_images.mkdir(parents=True, exist_ok=True)
        self._version = __version__
        self._lock = threading.Lock()
        # Autocommit (isolation_level=None): each INSERT is its own transaction, committed before append returns.
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
        mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            self._conn.close()
            raise OSError(f"audit log {self.path}: SQLite refused WAL mode (got journal_mode={mode!r}); put it on a "
                          f"local file system")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def append(self, *, endpoint: str, model: str, weights_sha256: str, input_sha256: str, outputs: dict[str, Any],
               backend: str = "", input_bytes: int = 0, client: str | None = None,
               image: bytes | None = None) -> int:
        """Commit one row and return its id. ``image`` is stored only when the log was given a folder for images."""
        image_path = self._store(image, input_sha256) if image is not None and self.store_images else None
        row = (datetime.now(timezone.utc).isoformat(timespec="milliseconds"), endpoint, model, weights_sha256,
               backend, input_sha256, int(input_bytes), json.dumps(outputs, separators=(",", ":")), client,
               None if image_path is None else str(image_path), self._version)
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO predictions (time_utc, endpoint, model, weights_sha256, backend, input_sha256, "
                "input_bytes, outputs, client, image_path, leukoscope_version) VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
            return int(cur.lastrowid)

    def _store(self, data: bytes, sha: str) -> Path:
        assert self.store_images is not None
        folder = self.store_images / sha[:2]
        folder.mkdir(exist_ok=True)
        path = folder / f"{sha}{image_suffix(data)}"
        if not path.exists():  # the same bytes are stored once; write-then-rename so no half file is ever seen
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return path

    def entries(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Rows oldest first (the last ``limit`` when given), ``outputs`` decoded."""
        sql = "SELECT * FROM predictions ORDER BY id"
        if limit is not None:
            sql = f"SELECT * FROM (SELECT * FROM predictions ORDER BY id DESC LIMIT {int(limit)}) ORDER BY id"
        with self._lock:
            cur = self._conn.execute(sql)
            names = [d[0] for d in cur.description]
            rows = cur.fetchall()
        out = []
        for r in rows:
            d = dict(zip(names, r, strict=True))
            d["outputs"] = json.loads(d["outputs"])
            out.append(d)
        return out

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""The audit log: WAL mode, one committed row per append, nothing earlier lost when a writer is killed mid-way,
safe under concurrent writers, images stored under their hash only when asked."""

from __future__ import annotations

import hashlib
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from leukoscope.serve.audit import AuditLog, image_suffix

_WRITER = """
import sys
from leukoscope.serve.audit import AuditLog
log = AuditLog(sys.argv[1])
i = 0
while True:
    row = log.append(endpoint="predict", model="m", weights_sha256="w" * 64, input_sha256=f"{i:064x}",
                     outputs={"label": "leukemic", "confidence": i / 1e6, "probabilities": {"healthy": 1 - i / 1e6,
                     "leukemic": i / 1e6}, "pad": "x" * 3000})
    print(row, i, flush=True)  # printed only after the commit returned
    i += 1
"""


def _row(i: int) -> dict:
    return {"label": "leukemic", "confidence": i / 1e6,
            "probabilities": {"healthy": 1 - i / 1e6, "leukemic": i / 1e6}, "pad": "x" * 3000}


def test_rows_and_settings(tmp_path):
    with AuditLog(tmp_path / "sub" / "a.sqlite") as log:
        a = log.append(endpoint="predict", model="leukemia-cell", weights_sha256="ab" * 32, input_sha256="cd" * 32,
                       outputs={"label": "healthy", "confidence": 0.75}, backend="onnx", input_bytes=123,
                       client="127.0.0.1")
        b = log.append(endpoint="explain", model="leukemia-cell", weights_sha256="ab" * 32, input_sha256="ef" * 32,
                       outputs={"label": "leukemic", "confidence": 0.875})
        assert (a, b) == (1, 2) and log.count() == 2
        rows = log.entries()
        assert rows[0]["outputs"] == {"label": "healthy", "confidence": 0.75}
        assert rows[0]["client"] == "127.0.0.1" and rows[1]["client"] is None
        assert rows[0]["input_bytes"] == 123 and rows[0]["backend"] == "onnx" and rows[0]["image_path"] is None
        assert rows[0]["time_utc"].endswith("+00:00") and rows[0]["leukoscope_version"]
        assert [r["id"] for r in log.entries(limit=1)] == [2]
    con = sqlite3.connect(tmp_path / "sub" / "a.sqlite")  # another connection sees committed rows, in WAL mode
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 2
    con.close()


def test_killed_writer_loses_no_committed_row(tmp_path):
    db = tmp_path / "audit.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(db)], stdout=subprocess.PIPE, text=True)
    committed: list[tuple[int, int]] = []
    deadline = time.monotonic() + 60
    try:
        while len(committed) < 300:
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                pytest.fail(f"the writer stopped after {len(committed)} rows (exit code {proc.poll()})")
            row, i = map(int, line.split())
            committed.append((row, i))
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-way: it is appending in a tight loop
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = {r[0]: (r[1], json.loads(r[2])) for r in con.execute("SELECT id, input_sha256, outputs FROM predictions")}
    con.close()
    assert len(rows) >= len(committed)  # rows committed after the last print may be there too
    for row, i in committed:
        sha, outputs = rows[row]
        assert sha == f"{i:064x}" and outputs == _row(i)
    with AuditLog(db) as log:  # reopens and goes on appending
        new = log.append(endpoint="predict", model="m", weights_sha256="w", input_sha256="z", outputs={})
        assert new > max(rows)


def test_concurrent_appends(tmp_path):
    log = AuditLog(tmp_path / "a.sqlite")
    ids: list[int] = []

    def work(t: int) -> None:
        for i in range(40):
            ids.append(log.append(endpoint="predict", model="m", weights_sha256="w", input_sha256=f"{t}-{i}",
                                  outputs={"t": t, "i": i}))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sorted(ids) == list(range(1, 321))
    assert {(r["outputs"]["t"], r["outputs"]["i"]) for r in log.entries()} == {(t, i) for t in range(8)
                                                                              for i in range(40)}
    log.close()


def test_images_stored_under_their_hash(tmp_path):
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
    sha = hashlib.sha256(png).hexdigest()
    with AuditLog(tmp_path / "a.sqlite", store_images=tmp_path / "imgs") as log:
        log.append(endpoint="predict", model="m", weights_sha256="w", input_sha256=sha, outputs={}, image=png)
        log.append(endpoint="explain", model="m", weights_sha256="w", input_sha256=sha, outputs={}, image=png)
        rows = log.entries()
    path = tmp_path / "imgs" / sha[:2] / f"{sha}.png"
    assert rows[0]["image_path"] == rows[1]["image_path"] == str(path) and path.read_bytes() == png
    assert [p.name for p in (tmp_path / "imgs").rglob("*") if p.is_file()] == [path.name]  # stored once, no temp
    with AuditLog(tmp_path / "b.sqlite") as log:  # without a folder nothing is stored
        log.append(endpoint="predict", model="m", weights_sha256="w", input_sha256=sha, outputs={}, image=png)
        assert log.entries()[0]["image_path"] is None
    assert image_suffix(b"\xff\xd8\xff\xe0") == ".jpg" and image_suffix(b"II*\x00") == ".tif"
    assert image_suffix(b"hello") == ".bin"

"""Load test of ``leukoscope serve`` on loopback: throughput, latency percentiles, errors and the server's memory.

Starts the server as a subprocess on 127.0.0.1 (a free port, a temporary audit log), then for each endpoint runs a
baseline of 1 client and the load of ``--clients`` concurrent clients (8), each for ``--duration`` seconds, posting
one real 224 x 224 px cell (an ALL-IDB2 crop, resized) over keep-alive connections. Errors (any non-200 answer or a
failed connection) must be zero. RSS is the server process's resident memory after start-up and at the end.
Prints a table and writes JSON to benchmarks/results/serve_load.json.

    nice -n 10 python benchmarks/serve_load.py                       # shipped model, predict + explain, 20 s each
    python benchmarks/serve_load.py --model path/to/model_dir --duration 10 --endpoints predict
    python benchmarks/serve_load.py --backend torch                  # the PyTorch backend instead of ONNX Runtime

Targets on 2 CPU cores at 8 concurrent clients: p95 below 100 ms for predict, below 500 ms for explain.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "serve_load.json"
TARGET_P95_MS = {"predict": 100.0, "explain": 500.0}
HOST = "127.0.0.1"  # loopback only, by design


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (Linux /proc; psutil elsewhere when installed)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2**20
    except Exception:
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used (Linux /proc; psutil elsewhere when installed)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        pass
    try:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except Exception:
        return None


def cell_png(size: int = 224) -> tuple[bytes, str]:
    """A real ALL-IDB2 cell resized to ``size`` px, as PNG bytes, and where it came from."""
    from PIL import Image

    from leukoscope.data.datasets import load_dataset

    path = load_dataset("all_idb2").samples[0].path
    with Image.open(path) as im:
        img = im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), f"ALL-IDB2 {path.name}"


def start_server(args: argparse.Namespace, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "leukoscope", "serve", "--host", HOST, "--port", str(port), "--audit-db",
           str(workdir / "audit.sqlite"), "--backend", args.backend, "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.onnx_threads is not None:
        cmd += ["--onnx-threads", str(args.onnx_threads)]
    log = open(workdir / "server.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    import httpx

    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_text = (workdir / "server.log").read_text()
            raise RuntimeError(f"the server exited with code {proc.returncode}:\n{log_text}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {args.start_timeout} s")


def run_phase(url: str, endpoint: str, image: bytes, clients: int, duration: float, server_pid: int) -> dict:
    """``clients`` threads, each with its own keep-alive connection, posting for ``duration`` seconds.

    Besides latency, the CPU time the server and the clients used per request: unlike latency it hardly depends on
    what else runs on the machine, so it tells what a quiet machine would do (2 cores give 2000 CPU-ms per second).
    """
    import httpx

    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[list[str]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                try:
                    r = c.post(f"/v1/{endpoint}", files={"file": ("cell.png", image, "image/png")})
                    ok = r.status_code == 200 and "label" in r.json()
                    if not ok:
                        errors[i].append(f"HTTP {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errors[i].append(f"{type(exc).__name__}: {exc}")
                    ok = False
                if ok:
                    latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + duration
    t_start = time.perf_counter()
    server_cpu0, client_cpu0 = cpu_seconds(server_pid), time.process_time()
    start.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_start
    server_cpu1, client_cpu1 = cpu_seconds(server_pid), time.process_time()
    lat = np.array([x for per in latencies for x in per]) * 1000
    errs = [e for per in errors for e in per]
    q = (lambda p: float(np.percentile(lat, p))) if len(lat) else (lambda p: float("nan"))
    return {"endpoint": endpoint, "clients": clients, "duration_s": round(wall, 2), "requests": int(len(lat)),
            "errors": len(errs), "error_samples": errs[:5], "throughput_rps": round(len(lat) / wall, 2),
            "p50_ms": round(q(50), 1), "p95_ms": round(q(95), 1), "p99_ms": round(q(99), 1),
            "max_ms": round(float(lat.max()), 1) if len(lat) else float("nan"),
            "server_cpu_ms_per_request": (round((server_cpu1 - server_cpu0) * 1000 / len(lat), 1)
                                          if len(lat) and server_cpu0 is not None and server_cpu1 is not None
                                          else None),
            "client_cpu_ms_per_request": round((client_cpu1 - client_cpu0) * 1000 / len(lat), 1) if len(lat) else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="shipped model name or model directory (default: leukemia-cell)")
    p.add_argument("--endpoints", default="predict,explain")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients of the load phases (default 8)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load phase (default 20)")
    p.add_argument("--baseline-duration", type=float, default=8.0, help="seconds of the 1-client baseline (0: none)")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "torch"])
    p.add_argument("--threads", type=int, default=None, help="PyTorch threads in the server (leukoscope serve)")
    p.add_argument("--onnx-threads", type=int, default=None,
                   help="ONNX Runtime threads per request in the server (leukoscope serve; 0: ONNX Runtime's defaults)")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not 1 <= args.clients <= 64:
        p.error(f"--clients must be between 1 and 64, got {args.clients}")
    if not 0 < args.duration <= 600:
        p.error(f"--duration must be in (0, 600] seconds, got {args.duration}")

    image, source = cell_png()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="leukoscope-load-") as tmp:
        proc, url = start_server(args, Path(tmp))
        try:
            import httpx

            info = httpx.get(url + "/v1/models", timeout=10).json()[0]
            for ep in args.endpoints.split(","):  # warm-up: first calls build Grad-CAM hooks, caches, ...
                for _ in range(3):
                    httpx.post(f"{url}/v1/{ep}", files={"file": ("cell.png", image, "image/png")}, timeout=60)
            rss_start = rss_mb(proc.pid)
            phases = []
            for ep in args.endpoints.split(","):
                if args.baseline_duration > 0:
                    phases.append(run_phase(url, ep, image, 1, args.baseline_duration, proc.pid))
                    print(_row(phases[-1]), flush=True)
                phases.append(run_phase(url, ep, image, args.clients, args.duration, proc.pid))
                print(_row(phases[-1]), flush=True)
            rss_end = rss_mb(proc.pid)
            audited = httpx.get(url + "/health", timeout=10).json()["audit_entries"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    served = sum(ph["requests"] for ph in phases)
    result = {
        "model": info["name"], "backend": info["backend"], "weights_sha256": info["weights_sha256"],
        "image": f"{source} resized to 224x224 PNG ({len(image)} bytes)", "clients": args.clients,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
        "load_average_before": load_before, "load_average_after": load_after,
        "rss_mb_start": None if rss_start is None else round(rss_start, 1),
        "rss_mb_end": None if rss_end is None else round(rss_end, 1),
        "audit_entries": audited, "requests_served": served, "phases": phases,
        "targets_p95_ms": TARGET_P95_MS,
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
    }
    print()
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return 1 if any(ph["errors"] for ph in phases) else 0


def _row(ph: dict) -> str:
    cpu = ph["server_cpu_ms_per_request"]
    return (f"| {ph['endpoint']:<8} | {ph['clients']:>7} | {ph['requests']:>8} | {ph['throughput_rps']:>8.1f} | "
            f"{ph['p50_ms']:>7.1f} | {ph['p95_ms']:>7.1f} | {ph['p99_ms']:>7.1f} | {ph['errors']:>6} | "
            f"{'n/a' if cpu is None else f'{cpu:.1f}':>10} | {ph['client_cpu_ms_per_request']:>10.1f} |")


def table(r: dict) -> str:
    lines = [f"model {r['model']} ({r['backend']}), {r['cpu_count']} CPUs, load average before "
             f"{_fmt_load(r['load_average_before'])}, after {_fmt_load(r['load_average_after'])}",
             "| endpoint | clients | requests |    req/s | p50 ms  | p95 ms  | p99 ms  | errors | server CPU "
             "| client CPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [_row(ph) for ph in r["phases"]]
    for ph in r["phases"]:
        target = TARGET_P95_MS.get(ph["endpoint"])
        if target and ph["clients"] == r["clients"]:
            verdict = "met" if ph["p95_ms"] < target else "MISSED"
            lines.append(f"target {ph['endpoint']} p95 < {target:.0f} ms at {ph['clients']} clients: {verdict} "
                         f"({ph['p95_ms']:.1f} ms)")
    lines.append("server CPU / client CPU: CPU-ms used per request by the server process / by this script's clients")
    lines.append(f"server RSS {r['rss_mb_start']} MiB after start-up, {r['rss_mb_end']} MiB at the end; "
                 f"{r['audit_entries']} audit rows for {r['requests_served']} measured requests (+ warm-up)")
    return "\n".join(lines)


def _fmt_load(x: tuple | None) -> str:
    return "n/a" if x is None else "/".join(f"{v:.1f}" for v in x)


if __name__ == "__main__":
    sys.exit(main())

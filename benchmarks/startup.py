"""Start-up and end-to-end time of the command line, side by side with baselines measured in the same run.

    .venv/bin/python benchmarks/startup.py [--repeats 5] [--n 550] [--json benchmarks/results/startup.json]

Rows (each a fresh process, wall time, median of ``--repeats``):

- ``python -c "import numpy, PIL.Image"``: the floor any Python image tool pays;
- ``leukoscope --help``;
- ``leukoscope predict ONE_IMAGE`` with the shipped model (ONNX Runtime, out-of-distribution score and quality
  checks included; the model's ONNX files are exported to the cache by a warm-up call first);
- ``leukoscope predict`` on ``--n`` Aria cells, end to end (start-up included), with and without the image-quality
  checks, against a plain eager PyTorch loop over the same images in its own process (import torch, load the model,
  read, prepare, forward in batches of 32; no checks, no out-of-distribution score).

Targets (issue 22): ``--help`` within 4x the floor, one-image ``predict`` within 10x, end-to-end ``predict`` at
least 5x faster than the eager loop.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

EAGER = r"""
import sys
import numpy as np, torch
from leukoscope.data.images import read_image
from leukoscope.models import load_model
paths = [l for l in open(sys.argv[1]).read().splitlines() if l]
model = load_model(sys.argv[2], backend="torch")
net = model.module
out = []
with torch.inference_mode():
    for i in range(0, len(paths), 32):
        x = np.stack([model.preprocess(read_image(p)) for p in paths[i:i + 32]]).astype(np.float32)
        out.append(net(torch.from_numpy(x)).numpy())
print(len(np.concatenate(out)))
"""


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="leukemia-cell")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--n", type=int, default=550)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from leukoscope.data.datasets import load_dataset

    paths = [str(s.path) for s in load_dataset("aria").samples[: args.n]]
    tmp = Path(tempfile.mkdtemp())
    listing = tmp / "paths.txt"
    listing.write_text("\n".join(paths))
    lk = str(BIN / "leukoscope")
    py = sys.executable
    one = [lk, "predict", paths[0], "--model", args.model, "--output", str(tmp / "one.csv"), "--no-progress"]
    many = [lk, "predict", *paths, "--model", args.model, "--output", str(tmp / "many.csv"), "--no-progress"]
    fast = [*many, "--no-quality-checks"]
    rows = {
        "import numpy, PIL.Image": [py, "-c", "import numpy, PIL.Image"],
        "leukoscope --help": [lk, "--help"],
        "leukoscope predict, one image": one,
        f"leukoscope predict, {len(paths)} images": many,
        f"leukoscope predict --no-quality-checks, {len(paths)} images": fast,
        f"eager PyTorch loop, {len(paths)} images": [py, "-c", EAGER, str(listing), args.model],
    }
    timed(one)  # warm-up: exports the model's ONNX graphs to the cache once
    res = {name: [] for name in rows}
    for _ in range(args.repeats):  # interleaved, so that a slow moment hits every row alike
        for name, cmd in rows.items():
            res[name].append(round(timed(cmd), 3))
    med = {k: statistics.median(v) for k, v in res.items()}
    floor = med["import numpy, PIL.Image"]
    out = {
        "date": time.strftime("%Y-%m-%d"), "machine": {"cpu": platform.processor() or platform.machine(),
                                                        "python": platform.python_version()},
        "model": args.model, "n_images": len(paths), "repeats": args.repeats, "seconds": res, "median_s": med,
        "ratios": {
            "help_over_import_floor": round(med["leukoscope --help"] / floor, 2),
            "predict_one_over_import_floor": round(med["leukoscope predict, one image"] / floor, 2),
            "eager_over_predict_end_to_end": round(med[f"eager PyTorch loop, {len(paths)} images"]
                                                   / med[f"leukoscope predict, {len(paths)} images"], 2),
            "eager_over_predict_without_quality_checks": round(
                med[f"eager PyTorch loop, {len(paths)} images"]
                / med[f"leukoscope predict --no-quality-checks, {len(paths)} images"], 2),
        },
        "targets": {"help_over_import_floor": "<= 4", "predict_one_over_import_floor": "<= 10",
                    "eager_over_predict_end_to_end": ">= 5"},
    }
    for k, v in med.items():
        print(f"{k:>40}: {v:.3f} s")
    print(json.dumps(out["ratios"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

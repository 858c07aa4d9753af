"""`leukoscope predict` throughput and peak memory on a folder of 500 cell images, side by side with a plain eager
PyTorch loop over the same images, in one run.

    .venv/bin/python benchmarks/predict_speed.py [--model leukemia-cell] [--n 500] [--repeats 3] [--int8]

--network adds the float32 network alone on images read and prepared beforehand (the ceiling of the default).
--int8 adds a third row: `leukoscope predict --backend int8` on the model's int8 network (made here in a temporary
copy of the model directory by `leukoscope export --int8`, which also reports how often its labels agree with the
float32 network's on held-out images).

Targets (issue 3): >= 100 images/s at 224 px on 2 CPU cores after start-up, >= 5x the eager loop, peak RSS <= 1.5 GB.
Each variant runs in its own process (so its peak memory is its own); medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np, torch
from leukoscope.models import load_model
from leukoscope.predict import predict_files
from leukoscope.data.images import read_image
from pathlib import Path
variant, model_name, listing, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
paths = [Path(p) for p in Path(listing).read_text().split("\n") if p]
torch.set_num_threads(2)
if variant in ("leukoscope", "int8", "tta"):
    model = load_model(model_name, backend="int8" if variant == "int8" else "auto",  # ONNX Runtime when installed
                       tta=variant == "tta")
    predict_files(model, paths[:32])                    # warm-up (start-up excluded)
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); preds, failed = predict_files(model, paths); times.append(time.perf_counter() - t)
    backend = model.engine
elif variant == "network":  # the float32 network alone on images read and prepared beforehand: the ceiling
    model = load_model(model_name, backend="auto")
    x = model.prepare_batch([read_image(p) for p in paths])
    model.logits(x[:32])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for i in range(0, len(x), 32):
            model.logits(x[i:i + 32])
        times.append(time.perf_counter() - t)
    backend = model.engine + ", network only"
else:  # the baseline: read, preprocess and run the model one image at a time in eager PyTorch
    model = load_model(model_name, backend="torch")
    net, pre = model.module, model.preprocess
    with torch.inference_mode():
        net(torch.from_numpy(pre(read_image(paths[0])))[None])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.inference_mode():
            for p in paths:
                net(torch.from_numpy(pre(read_image(p)))[None]).softmax(1)
        times.append(time.perf_counter() - t)
    backend = "torch eager, batch 1"
# this process's own high-water mark (ru_maxrss would carry the parent's size at fork over the exec)
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024
print(json.dumps({"variant": variant, "backend": backend, "n": len(paths), "seconds": times, "peak_rss_mb": peak}))
"""


def run(variant: str, model: str, listing: Path, repeats: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, variant, model, str(listing), str(repeats)],
                         capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["peak_rss_mb"] = round(out["peak_rss_mb"], 1)  # the child's own peak (whole process, start-up included)
    secs = sorted(out["seconds"])
    out["median_images_per_s"] = round(out["n"] / secs[len(secs) // 2], 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="leukemia-cell")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--int8", action="store_true", help="also time the int8 network (see the module docstring)")
    ap.add_argument("--tta", action="store_true", help="also time `leukoscope predict --tta` (4 flips per image)")
    ap.add_argument("--network", action="store_true",
                    help="also time the float32 network alone on images decoded and prepared beforehand (batches of "
                         "32): what `leukoscope predict` could reach if reading the files cost nothing")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "predict_speed.json"))
    args = ap.parse_args()
    from leukoscope.data.datasets import load_dataset

    # 500 single-cell images of mixed sizes: DeepAPL JPEGs (360x363), resized to 224 px by the model's preprocessing
    samples = [s for s in load_dataset("deepapl").samples if "SMU_15364290" not in s.path.name
               and "BL_6611696" not in s.path.name][: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "paths.txt"
        listing.write_text("\n".join(str(s.path) for s in samples))
        base = run("eager", args.model, listing, args.repeats)
        fast = run("leukoscope", args.model, listing, args.repeats)
        rows = [("leukoscope predict", fast), ("eager PyTorch loop", base)]
        if args.int8:
            import shutil

            from leukoscope.models.modeldir import resolve_model_dir

            copy = Path(tmp) / "model"
            shutil.copytree(resolve_model_dir(args.model), copy)
            # in its own process, so that this one stays small for the children it starts
            subprocess.run([sys.executable, "-m", "leukoscope", "export", "--model", str(copy), "--int8"],
                           capture_output=True, text=True, check=True)
            q = run("int8", str(copy), listing, args.repeats)
            q["agreement_with_fp32"] = json.loads((copy / "model.int8.json").read_text())
            rows.insert(1, ("leukoscope predict --backend int8", q))
        if args.tta:
            rows.insert(1, ("leukoscope predict --tta", run("tta", args.model, listing, args.repeats)))
        if args.network:
            rows.insert(1, ("float32 network alone (no reading)", run("network", args.model, listing, args.repeats)))
    ratio = fast["median_images_per_s"] / base["median_images_per_s"]
    print(f"{len(samples)} images, model {args.model}, median of {args.repeats} runs after start-up\n")
    print("| variant | backend | images/s (median) | peak RSS MB |")
    print("|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['backend']} | {r['median_images_per_s']} | {r['peak_rss_mb']} |")
    print(f"\nspeed-up: {ratio:.1f}x  (targets: >= 100 images/s, >= 5x, peak RSS <= 1536 MB)")
    result = {"leukoscope": fast, "eager": base, "speedup": ratio}
    named = dict(rows)
    if args.tta:
        result["tta"] = named["leukoscope predict --tta"]
    if args.network:
        n = result["network_only"] = named["float32 network alone (no reading)"]
        result["speedup_network_only"] = n["median_images_per_s"] / base["median_images_per_s"]
        print(f"float32 network alone: {result['speedup_network_only']:.1f}x the eager loop (the ceiling of the "
              f"float32 default on this machine)")
    if args.int8:
        q = named["leukoscope predict --backend int8"]
        result["int8"], result["speedup_int8"] = q, q["median_images_per_s"] / base["median_images_per_s"]
        c = q["agreement_with_fp32"]
        print(f"int8: {result['speedup_int8']:.1f}x the eager loop; labels agree with float32 on "
              f"{c['label_agreement']:.4f} of {c['n_images']} held-out images (mean probability difference "
              f"{c['mean_abs_prob_diff']:.4f}, largest {c['max_abs_prob_diff']:.4f})")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

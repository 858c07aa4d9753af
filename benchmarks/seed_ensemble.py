"""Seeds of one recipe side by side, their logit ensemble and their weight average ("soup"), on held-out groups.

    leukoscope train --config configs/leukemia-cell.yaml --set seed=K split_seed=0 --out runs/ship_sK   # K = 1..4
    python benchmarks/seed_ensemble.py leukemia-cell runs/ship_s1 runs/ship_s2 runs/ship_s3 runs/ship_s4 \
        --out benchmarks/results/seed_ensemble_leukemia-cell.json

Every model must have the same split (``split.json``), classes, preprocessing and architecture (checked). For each
model and for the two combinations, per dataset the model was trained on, on the validation and test parts of that
split: accuracy, sensitivity and specificity (the first class is the negative one; binary models only), ROC AUC and
the mean negative log-likelihood, all at a temperature fitted on the validation parts of all datasets together (each
model's own for the single models). The ensemble averages the logits of all models (cost: one network per model at
prediction; with a frozen shared stem, one trained top per model). The soup averages their weights into one network
of the same size (no cost at prediction); it only makes sense when the models start from the same weights and stay in
one basin, which the validation NLL shows. Nothing is chosen among the models: all of them go into both combinations.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import roc_auc_score

from leukoscope.evaluate.run import model_logits, select
from leukoscope.models.modeldir import file_sha256, load_model, resolve_model_dir
from leukoscope.train.trainer import fit_temperature

PARTS = ("val", "test")


def logits_per_part(model_dir: Path, datasets: list[str]) -> dict:
    m = load_model(model_dir, backend="auto")
    out = {}
    for d in datasets:
        for part in PARTS:
            z, y, samples, _ = model_logits(m, select(m, d, part))
            out[(d, part)] = (z, y, [str(s.path) for s in samples])
    return out


def soup_dir(dirs: list[Path], out: Path) -> Path:
    """A copy of the first model directory with the weights averaged over ``dirs`` (integer buffers: the first's)."""
    shutil.copytree(dirs[0], out, ignore=shutil.ignore_patterns("*.onnx", "*.json", "checkpoints"))
    shutil.copy(dirs[0] / "model.json", out / "model.json")
    shutil.copy(dirs[0] / "split.json", out / "split.json")
    states = [load_file(str(d / "model.safetensors")) for d in dirs]
    avg = {k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
           for k, v in states[0].items()}
    save_file(avg, str(out / "model.safetensors"))
    info = json.loads((out / "model.json").read_text())
    info["weights_sha256"] = file_sha256(out / "model.safetensors")
    (out / "model.json").write_text(json.dumps(info, indent=1))
    return out


def scores(logits: dict, datasets: list[str], classes: list[str]) -> dict:
    zv = np.concatenate([logits[(d, "val")][0] for d in datasets])
    yv = np.concatenate([logits[(d, "val")][1] for d in datasets])
    t = fit_temperature(zv, yv)
    row: dict = {"temperature": t}
    for d in datasets:
        for part in PARTS:
            z, y, _ = logits[(d, part)]
            z = z / t
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            pred = p.argmax(1)
            r = {"n": int(len(y)), "accuracy": float((pred == y).mean()),
                 "nll": float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())}
            if part == "test":  # each test image's probability of the second class, in the order of "images"
                r["p_positive"] = [round(float(x), 4) for x in p[:, -1]]
            if len(classes) == 2:
                r["sensitivity"] = float((pred[y == 1] == 1).mean()) if (y == 1).any() else None
                r["specificity"] = float((pred[y == 0] == 0).mean()) if (y == 0).any() else None
                r["auc"] = float(roc_auc_score(y, p[:, 1])) if len(set(y.tolist())) == 2 else None
            row[f"{d}/{part}"] = r
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+", help="model names or directories of one recipe, different seeds")
    ap.add_argument("--out", help="results JSON")
    args = ap.parse_args()
    dirs = [resolve_model_dir(m) for m in args.models]
    infos = [json.loads((d / "model.json").read_text()) for d in dirs]
    splits = [(d / "split.json").read_bytes() for d in dirs]
    for d, info, split in zip(dirs[1:], infos[1:], splits[1:]):
        for key in ("classes", "preprocess", "spec"):
            if info[key] != infos[0][key]:
                raise SystemExit(f"{d}: {key} differs from {dirs[0]}'s")
        if split != splits[0]:
            raise SystemExit(f"{d}: split.json differs from {dirs[0]}'s (train the seeds with split_seed=0)")
    datasets, classes = list(infos[0]["datasets"]), list(infos[0]["classes"])

    per = {str(d): logits_per_part(d, datasets) for d in dirs}
    first = per[str(dirs[0])]
    for d, lg in per.items():
        for key, (_, _y, paths) in lg.items():
            if paths != first[key][2]:
                raise SystemExit(f"{d}: other readable images in {key} than {dirs[0]}")
    rows = {str(d): scores(lg, datasets, classes) for d, lg in per.items()}
    ens = {k: (np.mean([per[str(d)][k][0] for d in dirs], 0), v[1], v[2]) for k, v in first.items()}
    rows["ensemble"] = scores(ens, datasets, classes)
    with tempfile.TemporaryDirectory() as tmp:
        rows["soup"] = scores(logits_per_part(soup_dir(dirs, Path(tmp) / "soup"), datasets), datasets, classes)

    cols = [f"{d}/{p}" for d in datasets for p in PARTS]
    print("| model | T | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for name, row in rows.items():
        cells = []
        for c in cols:
            r = row[c]
            s = f"acc {r['accuracy']:.3f}"
            if "auc" in r:
                s += (f" se {r['sensitivity']:.3f} sp {r['specificity']:.3f} AUC {r['auc']:.4f}"
                      if r["auc"] is not None else "")
            cells.append(s + f" nll {r['nll']:.3f}")
        print(f"| {Path(name).name} | {row['temperature']:.3f} | " + " | ".join(cells) + " |")
    if args.out:
        images = {f"{d}/test": first[(d, "test")][2] for d in datasets}
        wrong = {}  # per test image: the models (single ones) that get it wrong at threshold 0.5
        for d in datasets:
            y = first[(d, "test")][1]
            for i, path in enumerate(images[f"{d}/test"]):
                bad = [Path(m).name for m in map(str, dirs)
                       if (rows[m][f"{d}/test"]["p_positive"][i] >= 0.5) != bool(y[i] == len(classes) - 1)]
                if bad:
                    wrong[path] = {"label": classes[int(y[i])], "wrong_in": bad}
        Path(args.out).write_text(json.dumps({"models": [str(d) for d in dirs],
                                              "weights_sha256": [i.get("weights_sha256") for i in infos],
                                              "test_images": images, "wrong_in_some_model": wrong,
                                              "results": rows}, indent=1))


if __name__ == "__main__":
    main()

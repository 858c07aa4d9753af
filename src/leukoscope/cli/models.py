"""``leukoscope models``: every shipped model with its kind, classes, what it takes as input and its headline metric."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("models", help="list the shipped models: kind, classes, input")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=main)
    return p


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _image(d: Path, info: dict) -> dict[str, Any]:
    pre = info.get("preprocess", {})
    crop = ", cell cut out of its background" if pre.get("crop") == "cutout" else ""
    m = _read_json(d / "metrics.json").get("per_image", {})
    return {"classes": list(info["classes"]), "input": f"one cell image (RGB, seen at {pre.get('size', '?')} px{crop})",
            "architecture": f"{info['spec'].get('model', 'cnn')} {info['spec'].get('backbone', '')}".strip(),
            "metrics": {"what": f"held-out images (n={m['n']})", "accuracy": m.get("accuracy"), "auc": m.get("auc")}
            if m.get("n") else {}}


PATIENT_METHODS = {"mean": "mean of the cells' P(APL)", "mil": "gated-attention MIL over the cells",
                   "proportions": "logistic regression on the cell-type proportions"}


def _patient(d: Path, info: dict) -> dict[str, Any]:
    metrics = _read_json(d / "metrics.json")
    cv = metrics.get("cross_validation", {}).get(metrics.get("method", ""), {})
    return {"classes": list(info["classes"]),
            "input": f"a folder (or manifest CSV) of one patient's cell images; the cell-type model "
                     f"{info.get('cell_type_model', 'cell-type')!r} supplies the features",
            "architecture": PATIENT_METHODS.get(info.get("method"), str(info.get("method"))),
            "metrics": {"what": f"patient-level cross-validation (n={cv['n']} patients)", "accuracy": None,
                        "auc": cv.get("auc")} if cv.get("n") else {}}


def _flow(d: Path, info: dict) -> dict[str, Any]:
    classes = json.loads((d / "classes.json").read_text()) if (d / "classes.json").is_file() else []
    if info.get("input") == "fcs":
        panel = info.get("training", {}).get("panel", {})
        tubes = "; ".join(f"tube {t}: {', '.join(markers)}" for t, markers in panel.items())
        what = "one flow cytometry FCS file per subject" + (f" ({tubes})" if tubes else "")
    else:
        what = f"a feature table with {len(info.get('feature_names', []))} columns per subject"
    metrics = _read_json(d / "metrics.json")
    pooled, n = metrics.get("cv", {}).get("pooled", {}), metrics.get("n_subjects")
    return {"classes": classes, "input": what,
            "architecture": f"{info.get('classifier', {}).get('kind', '?')} on {len(info.get('feature_names', []))} "
                            "features per subject",
            "metrics": {"what": f"subject-level cross-validation (n={n} subjects)", "accuracy": pooled.get("accuracy"),
                        "auc": pooled.get("auc")} if n else {}}


def _classical(d: Path, info: dict) -> dict[str, Any]:
    meta = _read_json(d / "classical.json")
    return {"classes": list(meta.get("classes", info.get("classes", []))),
            "architecture": meta.get("kind", "?"), "metrics": {}}


def _detector(d: Path, info: dict) -> dict[str, Any]:
    return {"classes": ["white cell"],
            "architecture": f"{info.get('architecture', 'centre heatmap')}; red cell = {info.get('work_rbc_px')} px",
            "metrics": {}}


DESCRIBE = {"image": _image, "patient": _patient, "flow": _flow, "classical": _classical, "detector": _detector}


def describe(d: Path) -> dict[str, Any]:
    """Kind, classes, input, architecture and headline metric of a model directory, read from its files (no model
    is loaded)."""
    from leukoscope.models.modeldir import MODEL_KINDS, model_kind

    kind = model_kind(d)
    info = _read_json(d / "model.json")
    row = {"name": info.get("name", d.name), "kind": kind, **DESCRIBE[kind](d, info)}
    row.setdefault("input", MODEL_KINDS[kind]["input"])
    row["returns"], row["use"] = MODEL_KINDS[kind]["returns"], MODEL_KINDS[kind]["use"]
    return row


def main(args: argparse.Namespace) -> int:
    from leukoscope.models.modeldir import SHIPPED_DIR, shipped_models

    rows = [{**describe(SHIPPED_DIR / name), "name": name} for name in shipped_models()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        m = r["metrics"]
        score = ", ".join(f"{k}={m[k]:.3f}" for k in ("accuracy", "auc") if m.get(k) is not None)
        score = f"{score} on {m['what']}" if score else "see its MODEL_CARD.md"
        print(f"{r['name']} ({r['kind']} model: {r['architecture']})\n"
              f"  classes: {', '.join(r['classes'])}\n"
              f"  input:   {r['input']}\n"
              f"  use:     model = leukoscope.load_model({r['name']!r}); {r['use']}\n"
              f"  metrics: {score}")
    return 0

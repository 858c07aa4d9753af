"""``leukoscope fuse apply|fit``: combine per-patient image evidence with the flow cytometry probability.

``apply`` reads cell-level image predictions (aggregated per patient: the mean cell probability) and per-patient
flow probabilities, and writes one fused row per patient. ``fit`` learns stacking weights from a lab's own
*paired* cases (CSV ``patient,p_image,p_flow,label``) and reports their cross-validated effect on those cases.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

IMAGE_POSITIVE_GUESSES = ("p_aml", "p_all", "p_leukemia", "p_blast", "p_malignant", "p_abnormal")
FUSED_COLUMNS = ("patient", "p_image", "p_flow", "p_fused", "label", "confidence", "n_cells")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("fuse", help="fuse per-patient image evidence with flow cytometry probabilities")
    fsub = p.add_subparsers(dest="fuse_command", metavar="ACTION", required=True)

    a = fsub.add_parser("apply", help="fused P(leukemia) per patient")
    a.add_argument("--image", help="cell-level CSV (e.g. `leukoscope predict` output) with a patient column")
    a.add_argument("--image-col", help=f"image probability column (default: the one of {IMAGE_POSITIVE_GUESSES})")
    a.add_argument("--image-patient-col", default="patient",
                   help="patient id column of --image; 'parent' = folder name of the 'path' column")
    a.add_argument("--flow", help="per-patient flow CSV (e.g. `leukoscope flow predict` output + a patient column)")
    a.add_argument("--flow-col", default="p_aml", help="flow probability column (default p_aml)")
    a.add_argument("--flow-patient-col", default="patient",
                   help="patient id column of --flow; 'stem' = file name without extension of the 'path' column")
    a.add_argument("--weights", help="fusion JSON from `leukoscope fuse fit` (default: late fusion, unit weights)")
    a.add_argument("--w-image", type=float, help="late fusion weight of the image log-odds (default 1)")
    a.add_argument("--w-flow", type=float, help="late fusion weight of the flow log-odds (default 1)")
    a.add_argument("--prior", type=float,
                   help="prevalence both models were calibrated at; sets the bias to -(w_image + w_flow - 1) * "
                        "logit(prior) (naive-Bayes combination)")
    a.add_argument("--bias", type=float, help="late fusion log-odds bias (default 0; ignored with --prior)")
    a.add_argument("--threshold", type=float, default=0.5, help="p_fused >= threshold is called leukemia")
    a.add_argument("--output", help="CSV to write (default: stdout)")

    f = fsub.add_parser("fit", help="fit stacking weights on paired cases (CSV in, fusion JSON out)")
    f.add_argument("--paired", required=True, help="CSV with columns patient,p_image,p_flow,label")
    f.add_argument("--label-col", default="label")
    f.add_argument("--positive", default="aml", help="label value meaning leukemia (also accepts 1)")
    f.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the stacking logistic regression")
    f.add_argument("--folds", type=int, default=5, help="CV folds for the report on the paired cases")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the AUC CI in the report")
    f.add_argument("--output", required=True, help="fusion JSON to write")
    f.add_argument("--report", help="also write the CV report (JSON) here")
    p.set_defaults(func=main)
    return p


def _read_csv(path: str) -> tuple[list[str], list[dict]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _patients(rows: list[dict], header: list[str], col: str, source: str) -> list[str]:
    if col in ("parent", "stem"):
        if "path" not in header:
            raise ValueError(f"{source}: patient column {col!r} derives the id from a 'path' column, which is missing")
        return [Path(r["path"]).parent.name if col == "parent" else Path(r["path"]).stem for r in rows]
    if col not in header:
        raise ValueError(f"{source}: no patient column {col!r}; columns are {header}. Add one, or use 'parent'/'stem'")
    return [str(r[col]).strip() for r in rows]


def _prob_column(header: list[str], col: str | None, source: str) -> str:
    if col:
        if col not in header:
            raise ValueError(f"{source}: no column {col!r}; columns are {header}")
        return col
    found = [c for c in IMAGE_POSITIVE_GUESSES if c in header]
    if len(found) != 1:
        raise ValueError(f"{source}: say which column holds the leukemia probability (--image-col); "
                         f"probability columns: {[c for c in header if c.startswith('p_')]}")
    return found[0]


def _floats(rows: list[dict], col: str, source: str) -> list[float]:
    out = []
    for i, r in enumerate(rows, start=2):
        try:
            v = float(r[col])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source} line {i}: {col}={r[col]!r} is not a number") from exc
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{source} line {i}: {col}={v} is not a probability in [0, 1]")
        out.append(v)
    return out


def main(args: argparse.Namespace) -> int:
    return _fit(args) if args.fuse_command == "fit" else _apply(args)


def _apply(args: argparse.Namespace) -> int:
    import numpy as np

    from leukoscope.flow.fusion import FusionWeights, fuse, load_fusion, patient_image_evidence

    if not args.image and not args.flow:
        raise ValueError("give --image and/or --flow")
    image: dict[str, tuple[float, int]] = {}
    if args.image:
        header, rows = _read_csv(args.image)
        col = _prob_column(header, args.image_col, args.image)
        pats = _patients(rows, header, args.image_patient_col, args.image)
        names, means = patient_image_evidence(pats, _floats(rows, col, args.image))
        counts = {n: pats.count(n) for n in names}
        image = {n: (float(m), counts[n]) for n, m in zip(names, means, strict=True)}
    flow: dict[str, float] = {}
    if args.flow:
        header, rows = _read_csv(args.flow)
        col = _prob_column(header, args.flow_col, args.flow)
        pats = _patients(rows, header, args.flow_patient_col, args.flow)
        vals = _floats(rows, col, args.flow)
        per: dict[str, list[float]] = {}
        for pat, v in zip(pats, vals, strict=True):
            per.setdefault(pat, []).append(v)
        flow = {k: float(np.mean(v)) for k, v in per.items()}  # several tubes/files of one patient: their mean
    if args.weights:
        weights = load_fusion(args.weights)
    else:
        weights = FusionWeights(w_image=1.0 if args.w_image is None else args.w_image,
                                w_flow=1.0 if args.w_flow is None else args.w_flow,
                                bias=0.0 if args.bias is None else args.bias, prior=args.prior)
    patients = sorted(set(image) | set(flow))
    pi = np.array([image[p][0] if p in image else np.nan for p in patients])
    pf = np.array([flow.get(p, np.nan) for p in patients])
    fused = fuse(pi, pf, weights)
    fh = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        w = csv.DictWriter(fh, fieldnames=list(FUSED_COLUMNS), lineterminator="\n")
        w.writeheader()
        for p, a, b, z in zip(patients, pi, pf, fused, strict=True):
            pos = z >= args.threshold
            w.writerow({"patient": p, "p_image": "" if np.isnan(a) else f"{a:.6f}",
                        "p_flow": "" if np.isnan(b) else f"{b:.6f}", "p_fused": f"{z:.6f}",
                        "label": "leukemia" if pos else "normal", "confidence": f"{z if pos else 1 - z:.6f}",
                        "n_cells": image[p][1] if p in image else 0})
    finally:
        if fh is not sys.stdout:
            fh.close()
    only_i = sum(1 for p in patients if p not in flow)
    only_f = sum(1 for p in patients if p not in image)
    if only_i or only_f:
        print(f"leukoscope fuse: {only_i} patient(s) without flow, {only_f} without image evidence; their fused "
              "value uses the one modality they have", file=sys.stderr)
    return 0


def _fit(args: argparse.Namespace) -> int:
    import numpy as np

    from leukoscope.flow.fusion import evaluate_fusion_cv, fit_stacking, save_fusion

    header, rows = _read_csv(args.paired)
    need = ["p_image", "p_flow", args.label_col]
    missing = [c for c in need if c not in header]
    if missing:
        raise ValueError(f"{args.paired}: missing column(s) {missing}; a paired CSV has patient,p_image,p_flow,label")
    pi = np.array(_floats(rows, "p_image", args.paired))
    pf = np.array(_floats(rows, "p_flow", args.paired))
    labels = [str(r[args.label_col]).strip().lower() for r in rows]
    pos = {args.positive.lower(), "1"}
    negatives = sorted(set(labels) - pos)
    if len(negatives) > 1:
        raise ValueError(f"{args.paired}: column {args.label_col!r} must hold two values ({args.positive!r} = leukemia "
                         f"and one other), got {sorted(set(labels))}")
    y = np.array([1 if v in pos else 0 for v in labels])
    weights = fit_stacking(pi, pf, y, C=args.C)
    report = evaluate_fusion_cv(pi, pf, y, folds=args.folds, seed=args.seed, C=args.C, n_boot=args.n_boot)
    save_fusion(weights, args.output)
    print(f"fitted on {len(y)} paired patients ({int(y.sum())} leukemia): w_image={weights.w_image:.4f} "
          f"w_flow={weights.w_flow:.4f} bias={weights.bias:.4f} -> {args.output}")
    print(f"{'evidence':<14}{'AUC':>7}{'95% CI':>16}{'F1':>7}{'sens':>7}{'spec':>7}   (CV on these paired cases)")
    for name, m in report.items():
        ci = f"[{m['auc_ci_low']:.3f}, {m['auc_ci_high']:.3f}]"
        print(f"{name:<14}{m['auc']:>7.3f}{ci:>16}{m['f1']:>7.3f}{m['sensitivity']:>7.3f}{m['specificity']:>7.3f}")
    if args.report:
        Path(args.report).write_text(json.dumps({"paired": args.paired, "weights": weights.__dict__, "cv": report},
                                                indent=2, default=str) + "\n")
    return 0

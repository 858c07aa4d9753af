"""``leukoscope flow train|evaluate|predict``: flow cytometry AML vs normal, one prediction per subject."""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
from pathlib import Path

PRED_COLUMNS = ("path", "label", "confidence", "p_normal", "p_aml")


def _data_flags(q: argparse.ArgumentParser) -> None:
    q.add_argument("--config", help="flow config YAML (default: built-in defaults = configs/flow-aml.yaml)")
    q.add_argument("--input", choices=["fcs", "table"], help="train on FCS events or on a per-subject feature table")
    q.add_argument("--root", help="FlowCAP-II folder (default: <data root>/flow)")
    q.add_argument("--manifest", help="CSV path,subject,label[,tube] of your own FCS files (instead of FlowCAP-II)")
    q.add_argument("--table", help="per-subject feature CSV with a 'label' column (for --input table)")
    q.add_argument("--folds", type=int, help="outer CV folds")
    q.add_argument("--repeats", type=int, help="outer CV repeats")
    q.add_argument("--seed", type=int, help="CV seed")
    q.add_argument("--n-boot", type=int, help="bootstrap resamples for the AUC CI")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("flow", help="flow cytometry: train, evaluate and predict AML vs normal from FCS files")
    fsub = p.add_subparsers(dest="flow_command", metavar="ACTION", required=True)

    t = fsub.add_parser("train", help="fit a flow model on all subjects and write a model directory")
    _data_flags(t)
    t.add_argument("--classifier", choices=["svm", "logreg"], help="svm (default) or the logreg baseline")
    t.add_argument("--out", required=True, help="model directory to write")
    t.add_argument("--name", help="model name (default: the config's, flow-aml)")
    t.add_argument("--no-cv", action="store_true", help="skip the cross-validation (no metrics)")

    e = fsub.add_parser("evaluate", help="subject-level CV of a config, or a fitted model on labelled files")
    _data_flags(e)
    e.add_argument("--classifier", choices=["svm", "logreg", "both"], default="both")
    e.add_argument("--model", help="evaluate this fitted model directory on --manifest (no refitting)")
    e.add_argument("--json", dest="json_out", help="write the results to this JSON file")

    r = fsub.add_parser("predict", help="P(aml) per FCS file (each file one subject)")
    r.add_argument("files", nargs="*", help="FCS files")
    r.add_argument("--model", help="model directory (default: the shipped flow-aml model)")
    r.add_argument("--table", help="for a feature-table model: CSV with its feature columns (one row per subject)")
    r.add_argument("--output", help="CSV to write (default: stdout)")
    p.set_defaults(func=main)
    return p


def _config(args: argparse.Namespace):
    from leukoscope.flow.config import load_flow_config

    cfg = load_flow_config(args.config)
    data = {"input": args.input, "root": args.root, "table": args.table}
    if args.manifest:
        data.update(dataset="manifest", manifest=args.manifest)
    cv = {"folds": args.folds, "repeats": args.repeats, "seed": args.seed, "n_boot": args.n_boot}
    model = {"kind": args.classifier} if getattr(args, "classifier", None) in ("svm", "logreg") else {}
    return cfg.with_overrides(data=data, cv=cv, model=model)


def _progress(msg: str) -> None:
    if sys.stderr.isatty():
        print(f"  {msg}", file=sys.stderr)


def _metrics_rows(name: str, m: dict) -> str:
    p = m["pooled"]
    return (f"{name:<10}{m['n_subjects']:>5}{m['n_aml']:>5}  {p['auc']:.3f} [{p['auc_ci_low']:.3f}, "
            f"{p['auc_ci_high']:.3f}]  {p['f1']:.3f}  {p['sensitivity']:.3f}  {p['specificity']:.3f}  "
            f"{m['per_repeat']['auc']['mean']:.3f}+/-{m['per_repeat']['auc']['sd']:.3f}")


HEADER = (f"{'model':<10}{'n':>5}{'aml':>5}  {'AUC [95% CI]':<22}  {'F1':<5}  {'sens':<5}  {'spec':<5}  "
          "AUC over repeats")


def main(args: argparse.Namespace) -> int:
    if args.flow_command == "train":
        return _train(args)
    if args.flow_command == "evaluate":
        return _evaluate(args)
    return _predict(args)


def _train(args: argparse.Namespace) -> int:
    from leukoscope.flow.card import model_card
    from leukoscope.flow.model import save_flow_model, train_flow_model

    cfg = _config(args)
    if args.name:
        cfg = cfg.with_overrides(name=args.name)
    model, metrics = train_flow_model(cfg, evaluate=not args.no_cv, progress=_progress)
    command = "leukoscope flow train " + " ".join(
        f"{flag} {shlex.quote(str(v))}" for flag, v in (
            ("--config", args.config), ("--input", args.input), ("--root", args.root), ("--manifest", args.manifest),
            ("--table", args.table), ("--classifier", args.classifier), ("--folds", args.folds),
            ("--repeats", args.repeats), ("--seed", args.seed), ("--n-boot", args.n_boot), ("--name", args.name),
            ("--out", args.out))
        if v is not None) + (" --no-cv" if args.no_cv else "")
    out = save_flow_model(model, args.out, metrics=metrics, card=model_card(model, metrics, command=command))
    if "cv" in metrics:
        print(HEADER)
        print(_metrics_rows(model.classifier.kind, metrics["cv"]))
    print(f"wrote {out} ({len(model.feature_names)} features, {metrics['n_subjects']} subjects)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.model:
        return _evaluate_fitted(args)
    import numpy as np

    from leukoscope.flow.features import case_events
    from leukoscope.flow.model import cross_validate, cv_metrics, load_cases

    cfg = _config(args)
    kinds = ["svm", "logreg"] if args.classifier == "both" else [args.classifier]
    if cfg.data.input == "table":
        from leukoscope.flow.data import load_feature_table

        t = load_feature_table(cfg.data.table, root=cfg.data.root)
        data, y, groups = t.X, t.y, np.asarray(t.subjects)
    else:
        cases = load_cases(cfg)
        data = [case_events(c, cfg.features) for c in cases]
        y, groups = np.array([c.y for c in cases]), np.array([c.subject for c in cases])
    results = {"config": cfg.to_dict(), "models": {}}
    print(HEADER)
    for kind in kinds:
        c = cfg.with_overrides(model={"kind": kind})
        out = cross_validate(c, data, y, groups, progress=_progress)
        m = cv_metrics(out, n_boot=c.cv.n_boot, threshold=c.cv.threshold, seed=c.cv.seed)
        results["models"][kind] = m
        print(_metrics_rows(kind, m))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json_out}")
    return 0


def _evaluate_fitted(args: argparse.Namespace) -> int:
    import numpy as np

    from leukoscope.evaluate.metrics import binary_metrics
    from leukoscope.flow.data import read_manifest
    from leukoscope.flow.model import load_flow_model

    if not args.manifest:
        raise ValueError("flow evaluate --model DIR needs --manifest CSV (path,subject,label[,tube]) of held-out files")
    model = load_flow_model(args.model)
    cases = read_manifest(args.manifest)
    p = model.predict_proba_cases(cases)[:, 1]
    y = np.array([c.y for c in cases])
    m = binary_metrics(y, p, n_boot=args.n_boot if args.n_boot is not None else 1000)
    print(json.dumps({k: m[k] for k in ("n", "n_pos", "auc", "auc_ci_low", "auc_ci_high", "f1", "sensitivity",
                                        "specificity", "accuracy")}, indent=2))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"model": str(args.model), "manifest": str(args.manifest),
                                                   "metrics": m}, indent=2) + "\n")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from leukoscope.flow.model import load_flow_model, predict_files

    model = load_flow_model(args.model)
    if model.input == "table":
        if not args.table:
            raise ValueError(f"model {args.model} was trained on a feature table; pass --table CSV, not FCS files")
        rows, errors = _predict_table(model, args.table), []
    else:
        if not args.files:
            raise ValueError("give one or more FCS files to predict")
        rows, errors = predict_files(model, args.files)
    fh = open(args.output, "w", newline="") if args.output else sys.stdout  # noqa: SIM115
    try:
        w = csv.DictWriter(fh, fieldnames=list(PRED_COLUMNS), lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    finally:
        if fh is not sys.stdout:
            fh.close()
    for path, msg in errors:
        print(f"leukoscope flow predict: {msg}" if path in msg else f"leukoscope flow predict: {path}: {msg}",
              file=sys.stderr)
    if args.output:
        print(f"wrote {args.output}: {len(rows)} predicted, {len(errors)} unreadable", file=sys.stderr)
    return 1 if errors else 0


def _predict_table(model, table: str) -> list[dict]:
    import numpy as np

    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        records = list(reader)
    missing = [c for c in model.feature_names if c not in header]
    if missing:
        raise ValueError(f"{table} lacks feature columns the model needs, e.g. {missing[:5]}")
    X = np.array([[float(r[c]) for c in model.feature_names] for r in records])
    P = model.predict_proba_features(X)
    ids = [r.get("subject") or r.get("fcs_file") or r.get("path") or f"{table}#{i}" for i, r in enumerate(records)]
    rows = []
    for sid, p in zip(ids, P, strict=True):
        k = int(np.argmax(p))
        rows.append({"path": sid, "label": model.classes[k], "confidence": float(p[k]),
                     "p_normal": float(p[0]), "p_aml": float(p[1])})
    return rows

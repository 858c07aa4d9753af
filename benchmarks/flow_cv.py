"""Flow cytometry AML vs normal: subject-level cross-validation of the SVM against the logistic-regression baseline.

(a) the per-subject feature table of all 359 FlowCAP-II subjects (third-party features of all 8 tubes);
(b) end to end from raw tube-4 FCS events of the 32 subjects that have them, with the shipped config
    (configs/flow-aml.yaml) and three ablations: no cluster features, every file cut to 500 events (the CytoDx
    event count), and the $DFCiTOj compensation applied to data set 1, which the instrument had compensated
    already (so this compensates twice; tests/flow/test_flow_compensation.py shows why).
    Also: AUC within each file source, and how well the features tell the two file sources apart (a check on the
    raw/CytoDx confound).

Prints a table and writes JSON. Usage:
    python benchmarks/flow_cv.py --out runs/flow_cv.json [--repeats 5] [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _row(name: str, kind: str, m: dict) -> str:
    p = m["pooled"]
    r = m["per_repeat"]
    return (f"{name:<44}{kind:<8}{m['n_subjects']:>4}{m['n_aml']:>5}  {p['auc']:.3f} [{p['auc_ci_low']:.3f}, "
            f"{p['auc_ci_high']:.3f}]  {p['f1']:.3f}  {p['sensitivity']:.3f}  {p['specificity']:.3f}  "
            f"{r['auc']['mean']:.3f}+/-{r['auc']['sd']:.3f}  {r['f1']['mean']:.3f}+/-{r['f1']['sd']:.3f}")


HEADER = (f"{'data':<44}{'model':<8}{'n':>4}{'aml':>5}  {'AUC [95% CI]':<22}  {'F1':<5}  {'sens':<5}  {'spec':<5}  "
          f"{'AUC/repeat':<13}  F1/repeat")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "flow_cv.json"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "flow-aml.yaml"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--table-folds", type=int, default=5)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--quick", action="store_true", help="2 repeats, no ablations (a smoke run)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)

    from threadpoolctl import threadpool_limits

    from leukoscope.evaluate.metrics import roc_auc
    from leukoscope.flow.config import load_flow_config
    from leukoscope.flow.data import load_feature_table
    from leukoscope.flow.features import case_events
    from leukoscope.flow.model import cross_validate, cv_metrics, load_cases

    repeats = 2 if args.quick else args.repeats
    base = load_flow_config(args.config)
    results: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "python": platform.python_version(),
                     "config": base.to_dict(), "rows": []}
    print(HEADER)

    def run(name: str, cfg, data, y, groups, key: str) -> dict:
        t0 = time.perf_counter()
        with threadpool_limits(1):
            out = cross_validate(cfg, data, y, groups)
        m = cv_metrics(out, n_boot=args.n_boot, threshold=cfg.cv.threshold, seed=cfg.cv.seed)
        m.update(name=name, key=key, model=cfg.model.kind, seconds=time.perf_counter() - t0,
                 protocol=f"{cfg.cv.repeats} x {cfg.cv.folds}-fold subject-level stratified CV, "
                          f"inner {cfg.model.inner_folds}-fold", heldout_mean_p=out["p"].mean(0).tolist(),
                 subjects=[str(g) for g in groups])
        results["rows"].append(m)
        print(_row(name, cfg.model.kind, m), flush=True)
        return m

    # (a) feature table, 359 subjects
    table = load_feature_table()
    tcfg = base.with_overrides(data={"input": "table"}, cv={"folds": args.table_folds, "repeats": repeats})
    for kind in ("svm", "logreg"):
        run("feature table, 8 tubes", tcfg.with_overrides(model={"kind": kind}), table.X, table.y,
            np.asarray(table.subjects), key=f"table_{kind}")

    # (b) raw tube-4 events, 32 subjects
    cfg = base.with_overrides(cv={"repeats": repeats})
    cases = load_cases(cfg)
    y = np.array([c.y for c in cases])
    groups = np.array([c.subject for c in cases])
    source = np.array([c.source for c in cases])
    events = [case_events(c, cfg.features) for c in cases]
    fcs_rows = {}
    for kind in ("svm", "logreg"):
        fcs_rows[kind] = run("tube-4 FCS events", cfg.with_overrides(model={"kind": kind}), events, y, groups,
                             key=f"fcs_{kind}")
    per_source = {}
    for src in sorted(set(source)):
        m = source == src
        p = np.asarray(fcs_rows["svm"]["heldout_mean_p"])[m]
        per_source[src] = {"n": int(m.sum()), "n_aml": int(y[m].sum()), "auc": roc_auc(y[m], p),
                           "correct_at_0.5": int(((p >= 0.5) == (y[m] == 1)).sum())}
    results["per_source_svm"] = per_source
    # exact (Clopper-Pearson) 95% intervals of sensitivity and specificity: a bootstrap cannot widen a perfect score
    pooled = fcs_rows["svm"]["pooled"]
    exact = {key: {"k": int(k), "n": int(n), "ci_low": pooled[f"{key}_ci_low"], "ci_high": pooled[f"{key}_ci_high"]}
             for key, k, n in (("sensitivity", pooled["tp"], pooled["tp"] + pooled["fn"]),
                               ("specificity", pooled["tn"], pooled["tn"] + pooled["fp"]))}
    results["fcs_svm_exact_ci"] = exact
    print("  exact 95% CI (svm, tube-4): " + "; ".join(
        f"{k} {v['k']}/{v['n']} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]" for k, v in exact.items()))
    print("  per source (svm held-out): " + "; ".join(
        f"{s}: AUC {v['auc']:.3f}, {v['correct_at_0.5']}/{v['n']} correct ({v['n_aml']} AML)"
        for s, v in per_source.items()))

    if not args.quick:
        ablations = [
            ("  ablation: no cluster features", {"n_clusters": 0}),
            ("  ablation: every file cut to 500 events", {"max_events": 500}),
            ("  ablation: $DFCiTOj applied (twice)", {"compensation": "file"}),
        ]
        for name, change in ablations:
            acfg = cfg.with_overrides(features=change)
            ev = [case_events(c, acfg.features) for c in cases]
            run(name, acfg, ev, y, groups, key="fcs_svm_" + "_".join(f"{k}={v}" for k, v in change.items()))
        # Can the features tell raw (30,000 events) from CytoDx (500 events) files? Same pipeline, source as label.
        ys = (source == "cytodx").astype(int)
        for name, change in (("source raw-vs-cytodx (all events)", {}), ("source raw-vs-cytodx (500 events)",
                                                                          {"max_events": 500})):
            acfg = cfg.with_overrides(features=change)
            ev = events if not change else [case_events(c, acfg.features) for c in cases]
            with threadpool_limits(1):
                out = cross_validate(acfg, ev, ys, groups)
            auc = roc_auc(ys, out["p"].mean(0))
            results[name] = {"auc": auc}
            print(f"  {name}: AUC {auc:.3f} (0.5 = indistinguishable)")

    # prediction time of the shipped model, median of 5 (30,000-event raw file and 500-event CytoDx file)
    from leukoscope.flow.data import flow_data_root
    from leukoscope.flow.model import load_flow_model, predict_files

    model = load_flow_model()
    root = flow_data_root()
    timing = {}
    for label, path in (("raw 30,000 events", root / "flowcap2_aml_raw_fcs" / "0004.FCS"),
                        ("cytodx 500 events", root / "flowcap2_aml_cytodx_fcs" / "sample1.fcs")):
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            predict_files(model, [path])
            ts.append(time.perf_counter() - t0)
        timing[label] = statistics.median(ts)
    results["predict_seconds_median"] = timing
    print("  predict time per file (median of 5): " + "; ".join(f"{k}: {v * 1000:.0f} ms" for k, v in timing.items()))

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

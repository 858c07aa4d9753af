"""DeepAPL targets (issue 8): blasts from the cell-type model, and patient-level AML vs APL.

    nice -n 5 .venv/bin/python benchmarks/deepapl_targets.py                    # study + table + JSON
    nice -n 5 .venv/bin/python benchmarks/deepapl_targets.py --ship-apl src/leukoscope/weights/apl

Targets:
- blast ("Blast, no lineage spec") vs every other type, from the cell-type model: sensitivity >= 0.95 at
  specificity >= 0.90 on held-out patients, at an operating point chosen on validation patients;
- patient-level AML vs APL: AUC >= 0.90 in patient-level stratified cross-validation.

Held-out blast numbers come from (1) the shipped ``cell-type`` model on its own test patients (threshold from its
validation patients) and (2) the five fold-wise cell-type CNNs of the patient-level CV (threshold from each fold's
inner validation patients, pooled over the test folds). Patient-level AUCs come from out-of-fold scores pooled over
the folds of the first repeat, with a 95% percentile bootstrap CI over patients; methods on the frozen ImageNet
embedding are repeated with ``--repeats`` fold seeds. ``--ship-apl DIR`` fits the best method on all 82 patients and
writes it as a patient model directory with its card. Writes ``benchmarks/results/deepapl_targets.json``.

The DeepAPL publication (Sidhom et al., npj Precision Oncology 2021) could not be reached from this machine, so its
figures are not quoted here; its Validation cohort (24 patients) is not in this copy of the data.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from leukoscope.config import make_config
from leukoscope.diagnose.mil import MILConfig
from leukoscope.diagnose.model import copy_top, pooled
from leukoscope.evaluate.metrics import binary_metrics
from leukoscope.models.modeldir import SHIPPED_DIR, load_model
from leukoscope.research.patient_study import (
    BLAST,
    PROMYELOCYTE,
    CellData,
    bags_of,
    cnn_on_stem,
    fit_mean_lr,
    fit_mil_model,
    fit_proportions,
    load_cells,
    operating_point,
    run_cv,
    sens_spec,
    youden_threshold,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "cell-type.yaml"
TARGET_SENS, TARGET_SPEC, TARGET_AUC = 0.95, 0.90, 0.90
SHIPPABLE = ("mil_imagenet", "mil_celltype", "mean_lr_imagenet", "proportions_cnn")
LABELS = {
    "mean_cnn": "(a) mean of cell P(APL): fine-tuned CNN head (fold-wise)",
    "mean_lr_imagenet": "(a) mean of cell P(APL): logistic regression on frozen ImageNet embedding",
    "proportions_cnn": "(b) cell-type proportions (fold-wise cell-type CNN) -> logistic regression",
    "proportions_true_labels": "(b, reference) proportions of the annotators' labels -> logistic regression",
    "mil_imagenet": "(c) gated-attention MIL on frozen ImageNet embedding",
    "mil_celltype": "(c) gated-attention MIL on fold-wise cell-type CNN embedding",
}


def shipped_cell_type(data: CellData, model_dir: Path) -> dict:
    """The shipped cell-type model on its own split: per-class metrics and the blast operating point."""
    split = json.loads((model_dir / "split.json").read_text())["parts"]
    rel = {data.ds.relpath(s): i for i, s in enumerate(data.ds.samples)}
    idx = {part: np.array([rel[p] for p in paths if p in rel]) for part, paths in split.items()}
    if json.loads((model_dir / "model.json").read_text())["spec"].get("trainable_stages", 1) == 0:
        proba, _ = cnn_on_stem(model_dir, data.stem[:, 0])  # the head alone on the cached stem features
    else:  # a model that also trained the last stage: predict the val and test images themselves
        from leukoscope.models import load_model

        model = load_model(model_dir)
        proba = np.full((len(data.ds.samples), len(model.classes)), np.nan)
        need = np.concatenate([idx["val"], idx["test"]])
        _, pr, failed = model.predict_paths([data.ds.samples[i].path for i in need])
        if failed:
            raise RuntimeError(f"unreadable val/test images: {failed}")
        proba[need] = pr
    bi = data.ds.classes.index(BLAST)
    pv, yv = proba[idx["val"], bi], data.cell_type[idx["val"]] == bi
    pt, yt = proba[idx["test"], bi], data.cell_type[idx["test"]] == bi
    t = operating_point(pv, yv, TARGET_SENS)
    val_s, val_sp = sens_spec(pv, yv, t)
    s, sp = sens_spec(pt, yt, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auc = binary_metrics(yt.astype(int), pt, n_boot=1000, groups=list(data.patients[idx["test"]]))
    # optimistic reference: the best specificity on the test cells at test sensitivity >= 0.95
    t_oracle = operating_point(pt, yt, TARGET_SENS)
    metrics = json.loads((model_dir / "metrics.json").read_text())
    pc = metrics["per_image"]["per_class"]
    return {"model": str(model_dir), "n_val": int(len(idx["val"])), "n_test": int(len(idx["test"])),
            "n_test_patients": int(len(set(data.patients[idx["test"]]))),
            "n_test_blasts": int(yt.sum()), "n_val_blasts": int(yv.sum()),
            "threshold_from_val": t, "val_sensitivity": val_s, "val_specificity": val_sp,
            "test_sensitivity": s, "test_specificity": sp, "test_auc": auc["auc"],
            "test_auc_ci": [auc["auc_ci_low"], auc["auc_ci_high"]],
            "test_specificity_at_test_sens95 (optimistic)": sens_spec(pt, yt, t_oracle)[1],
            "per_class_test": pc, "accuracy_test": metrics["per_image"]["accuracy"],
            "macro_f1_test": metrics["per_image"]["macro"]["f1"]}


def fit_final(method: str, data: CellData, cell_type_dir: Path, mil_cfg: MILConfig):
    """The chosen method fitted on all patients (the shipped cell-type model supplies proportions / embeddings)."""
    labels = data.patient_labels()
    names = sorted(labels)
    y = np.array([labels[p] for p in names])
    views = np.stack([pooled(data.imagenet_top, data.stem[:, v]) for v in range(data.stem.shape[1])], 1)
    emb_in = views[:, 0]
    if method == "mil_imagenet":
        return fit_mil_model(bags_of(data.patients, emb_in, names), y, data.imagenet_top, mil_cfg,
                             bags_of(data.patients, views, names))
    if method == "mean_lr_imagenet":
        return fit_mean_lr(emb_in, data.diagnosis, data.imagenet_top)
    ct = load_model(cell_type_dir, backend="torch")
    ct_top = copy_top(ct.module.backbone.conv_head, ct.module.backbone.bn2)
    ct_p, ct_emb = cnn_on_stem(cell_type_dir, data.stem[:, 0])
    if method == "mil_celltype":
        return fit_mil_model(bags_of(data.patients, ct_emb, names), y, ct_top, mil_cfg)
    if method == "proportions_cnn":
        props = np.stack([ct_p[data.patients == p].mean(0) for p in names])
        return fit_proportions(props, y, data.imagenet_top)
    raise ValueError(f"cannot ship method {method!r}; shippable: {list(SHIPPABLE)}")


def write_apl_card(out: Path, method: str, results: dict, info: dict) -> None:
    m = results["methods"]
    lines = [
        "# Model card: apl (patient-level AML vs APL)", "",
        "Written by `benchmarks/deepapl_targets.py --ship-apl` (see docs/DIAGNOSE.md).", "",
        "## What it does",
        "Takes a patient's set of single white-cell images from a peripheral blood smear and gives P(APL) vs "
        "non-APL AML for the patient, the cells that weighed most, and (with the `cell-type` model) a differential "
        "count. Every patient it sees is assumed to have AML; it does not detect leukemia.", "",
        "## Method",
        f"`{method}`: {LABELS[method]}. Cells are encoded once by the frozen EfficientNet-Lite0 ImageNet stem of the "
        "`cell-type` model (all seven blocks), then by the 1x1 conv head stored here (pooled to 1280-d).",
        f"Parameters in `model.safetensors`: {info['n_parameters']} (every stored value: weights, BN statistics and "
        "the feature standardisation; the stem's are in `cell-type`).",
        f"Threshold {info['threshold']:.3f} on P(APL) ({info['threshold_source']}). P(APL) is not calibrated: the "
        "training is class-balanced (APL weighted 60/22), and for `mean` a patient's many normal cells pull it "
        "toward the middle; read it as a score.", "",
        "## Data seen",
        f"DeepAPL Discovery cohort in `../shared/data/aml_multiclass`: {results['n_patients']} patients "
        f"({results['n_patients'] - results['n_apl']} AML, {results['n_apl']} APL), {results['n_cells']} readable "
        "cells (2 truncated JPEGs skipped). The final model is fitted on all of them.", "",
        "## Patient-level cross-validation (the estimate for this recipe)",
        f"{results['n_splits']}-fold stratified by diagnosis, grouped by patient; every model inside a fold is fitted "
        "on its training patients only. AUC: pooled out-of-fold scores of repeat 0 with a 95% bootstrap CI over "
        "patients. Sensitivity / specificity for APL at P(APL) >= 0.5, and at a threshold chosen per outer fold by "
        "an inner 4-fold CV of its training patients (Youden).", "",
        "| method | AUC (95% CI) | sens / spec at 0.5 | sens / spec at inner-CV threshold | AUC over repeats |",
        "|---|---|---|---|---|",
    ]
    for k, v in m.items():
        r0, it = v["repeat0"], v.get("inner_threshold")
        rep = (f"{v['auc_mean']:.3f} +- {v['auc_sd']:.3f} (n={len(v['auc_repeats'])})" if len(v["auc_repeats"]) > 1
               else "-")
        inner = f"{it['sensitivity']:.3f} / {it['specificity']:.3f}" if it else "-"
        lines.append(f"| {LABELS.get(k, k)} | {r0['auc']:.3f} ({r0['auc_ci_low']:.3f}-{r0['auc_ci_high']:.3f}) | "
                     f"{r0['sensitivity']:.3f} / {r0['specificity']:.3f} | {inner} | {rep} |")
    lines += [
        "", "The shipped model is the method with the highest pooled AUC in repeat 0 among the shippable ones; "
        "choosing the best of several methods on the same folds makes its estimate somewhat optimistic.", "",
        "## Intended use",
        "Research, and a second reader for trained staff. Not a medical device, not validated clinically. APL is "
        "confirmed by PML-RARA testing; this model does not replace it.", "",
        "## Limits",
        "- 82 patients, 22 with APL, one hospital (Johns Hopkins), one analyser: wide CIs; other labs' stains and "
        "scanners are untested.",
        "- The DeepAPL Validation cohort (24 patients) is not in this copy, so there is no external test here.",
        "- The cells per patient were sub-sampled per cell type for this copy (DATA.md): the mix of cell types in a "
        "patient's bag is not the patient's true differential, and cell-type proportions partly reflect sampling.",
        "- Confounds in the labels: Promonocytes come almost only from AML patients and Plasma cells mostly from APL "
        "patients.",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")


CARD_BEGIN, CARD_END = "<!-- deepapl_targets:begin -->", "<!-- deepapl_targets:end -->"


def update_cell_type_card(model_dir: Path, shipped: dict, cv: dict | None, n_params: int) -> None:
    """Append (or replace) a section with per-class sensitivity / specificity and the blast operating point."""
    card = model_dir / "MODEL_CARD.md"
    text = card.read_text()
    if CARD_BEGIN in text:
        text = text[:text.index(CARD_BEGIN)].rstrip() + "\n"
    pc = shipped["per_class_test"]
    lines = [CARD_BEGIN, "", "## Parameters", f"Parameters: {n_params} (all of the network; the trained part is the "
             "1x1 conv head, its BN and the classifier).", "",
             "## Per class on the held-out test patients (argmax)", "",
             "| cell type | sensitivity | specificity | precision | F1 | cells |", "|---|---|---|---|---|---|"]
    for c, v in pc.items():
        name = f"**{c}**" if c in (BLAST, PROMYELOCYTE) else c
        lines.append(f"| {name} | {v['sensitivity']:.3f} | {v['specificity']:.3f} | {v['precision']:.3f} | "
                     f"{v['f1']:.3f} | {v['support']} |")
    lines += ["", "## Blasts (\"Blast, no lineage spec\" vs every other type)", "",
              f"Operating point chosen on the validation patients (sensitivity >= {TARGET_SENS}): P(blast) >= "
              f"{shipped['threshold_from_val']:.4f}. On the {shipped['n_test_patients']} test patients "
              f"({shipped['n_test_blasts']} blasts of {shipped['n_test']} cells): sensitivity "
              f"{shipped['test_sensitivity']:.3f}, specificity {shipped['test_specificity']:.3f}; blast-vs-rest AUC "
              f"{shipped['test_auc']:.3f} ({shipped['test_auc_ci'][0]:.3f}-{shipped['test_auc_ci'][1]:.3f}).",
              f"Target: sensitivity >= {TARGET_SENS} at specificity >= {TARGET_SPEC}."]
    if cv:
        lines += ["", f"Same recipe in {len(cv['per_fold'])}-fold patient-level CV (each fold's threshold from its "
                  f"inner validation patients; {cv['n_blasts']} blasts, {cv['n_other']} other cells, pooled): "
                  f"sensitivity {cv['pooled_test_sensitivity']:.3f}, specificity "
                  f"{cv['pooled_test_specificity']:.3f}, AUC {cv['auc']:.3f}."]
    met = shipped["test_sensitivity"] >= TARGET_SENS and shipped["test_specificity"] >= TARGET_SPEC
    lines += ["", f"The blast target is {'met' if met else '**not met**'} on the held-out patients."]
    lines += ["", "## Limits specific to DeepAPL",
              "- One hospital (Johns Hopkins), one analyser; the 24 Validation-cohort patients are not in this copy.",
              "- Cell types are confounded with the diagnosis (Promonocytes almost only from AML patients, Plasma "
              "cells mostly from APL patients): the model may use diagnosis cues to call a type. Rare types have "
              "2-18 test cells, so their per-class numbers are very uncertain.",
              "- The Aria / ALL-IDB limit above is part of the generic card and does not apply: DeepAPL groups are "
              "real patients.",
              "", "Source: `benchmarks/deepapl_targets.py` (results in `benchmarks/results/deepapl_targets.json`).",
              CARD_END]
    card.write_text(text + "\n" + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cell-type-model", default=str(SHIPPED_DIR / "cell-type"), help="shipped cell-type model dir")
    ap.add_argument("--work", default=str(ROOT / "runs" / "deepapl-cv"), help="fold-wise CNN runs go here")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5, help="fold seeds for the frozen-embedding methods")
    ap.add_argument("--cnn-repeats", type=int, default=1, help="fold seeds for the fold-wise CNN methods")
    ap.add_argument("--diagnosis-cnn", action="store_true",
                    help="also (a) with a fold-wise fine-tuned cell-level AML/APL CNN (5 more trainings per repeat)")
    ap.add_argument("--ship-apl", metavar="DIR", help="fit the best method on all patients and write it here")
    ap.add_argument("--update-card", action="store_true", help="add per-class and blast sections to the cell-type card")
    ap.add_argument("--reuse", action="store_true",
                    help="take the cross-validation from --out (a previous run) instead of running it again")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "deepapl_targets.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    t0 = time.time()
    cfg = make_config(file=CONFIG)
    data = load_cells(cfg, views=1 + cfg.recipe.aug_views)
    print(f"{len(data.patients)} readable cells from {len(set(data.patients))} patients; unreadable: "
          f"{[p for p, _ in data.unreadable]}")
    ct_dir = Path(args.cell_type_model)
    shipped = shipped_cell_type(data, ct_dir) if (ct_dir / "model.json").exists() else None
    mil_cfg = MILConfig()
    if args.reuse:
        previous = json.loads(Path(args.out).read_text())
        cv, t_cv = previous["cv"], previous.get("seconds_cv", previous.get("seconds"))
        print(f"cross-validation taken from {args.out}")
    else:
        cv = run_cv(data, CONFIG, Path(args.work), n_splits=args.folds, repeats=args.repeats,
                    cnn_repeats=args.cnn_repeats, mil_cfg=mil_cfg, diagnosis_cnn=args.diagnosis_cnn)
        t_cv = round(time.time() - t0)
    out = {"unreadable": data.unreadable, "shipped_cell_type": shipped, "cv": cv, "seconds_cv": t_cv}

    print("\n== Blast vs rest (cell-type model) ==")
    print(f"{'source':<46} {'threshold':>9} {'sens':>6} {'spec':>6} {'AUC':>6}  target met")
    rows = []
    if shipped:
        rows.append(("shipped cell-type, its test patients", shipped["threshold_from_val"], shipped["test_sensitivity"],
                     shipped["test_specificity"], shipped["test_auc"]))
    if "blast_oof" in cv:
        b = cv["blast_oof"]
        rows.append((f"{args.folds}-fold CV, pooled test folds", float("nan"), b["pooled_test_sensitivity"],
                     b["pooled_test_specificity"], b["auc"]))
    for name, t, s, sp, auc in rows:
        ok = s >= TARGET_SENS and sp >= TARGET_SPEC
        print(f"{name:<46} {t:>9.4f} {s:>6.3f} {sp:>6.3f} {auc:>6.3f}  {'yes' if ok else 'NO'}")
    if shipped:
        print("\nPer class, shipped model, test patients: " + ", ".join(
            f"{c}: sens {v['sensitivity']:.2f} spec {v['specificity']:.2f}" for c, v in
            shipped["per_class_test"].items() if c in (BLAST, PROMYELOCYTE)))

    print(f"\n== Patient-level AML vs APL, {args.folds}-fold CV ({cv['n_patients']} patients, {cv['n_apl']} APL) ==")
    print(f"{'method':<78} {'AUC':>6} {'95% CI':>13} {'sens@.5':>7} {'spec@.5':>7} {'sens@in':>7} {'spec@in':>7} "
          f"{'AUC mean+-sd (repeats)':>24}")
    for k, v in cv["methods"].items():
        r0, it = v["repeat0"], v.get("inner_threshold", {})
        rep = f"{v['auc_mean']:.3f}+-{v['auc_sd']:.3f} ({len(v['auc_repeats'])})"
        print(f"{LABELS.get(k, k):<78} {r0['auc']:>6.3f} {r0['auc_ci_low']:>6.3f}-{r0['auc_ci_high']:<6.3f} "
              f"{r0['sensitivity']:>7.3f} {r0['specificity']:>7.3f} {it.get('sensitivity', float('nan')):>7.3f} "
              f"{it.get('specificity', float('nan')):>7.3f} {rep:>24}")
    print("sens/spec@.5: APL at P(APL) >= 0.5; @in: at each outer fold's threshold from an inner 4-fold CV of its "
          "training patients (Youden)")
    best = max((k for k in cv["methods"] if k in SHIPPABLE), key=lambda k: cv["methods"][k]["repeat0"]["auc"])
    out["best_method"] = best
    print(f"\nbest shippable method: {best} (AUC {cv['methods'][best]['repeat0']['auc']:.3f}; target >= {TARGET_AUC}: "
          f"{'met' if cv['methods'][best]['repeat0']['auc'] >= TARGET_AUC else 'NOT met'})")

    if args.ship_apl:
        pm = fit_final(best, data, ct_dir, mil_cfg)
        oof0 = cv["methods"][best]["oof_repeat0"]
        labels = data.patient_labels()
        pm.threshold = youden_threshold(np.array([labels[p] for p in sorted(oof0)]),
                                        np.array([oof0[p] for p in sorted(oof0)]))
        ct = load_model(ct_dir, backend="torch")
        info = {"name": "apl", "cell_type_model": "cell-type",
                "cell_type_model_sha256": ct.info.get("weights_sha256"),
                "stem": {"backbone": ct.info["spec"]["backbone"],
                         "trainable_stages": ct.info["spec"]["trainable_stages"],
                         "weights_source": data.weights_source},
                "embedding": "cell-type model's conv head" if best == "mil_celltype" else "frozen ImageNet conv head",
                "trained_on": {"dataset": "deepapl", "patients": cv["n_patients"], "apl": cv["n_apl"],
                               "cells": cv["n_cells"]},
                "method_label": LABELS[best],
                "threshold_source": "Youden point of the out-of-fold patient scores of the cross-validation (repeat 0)"}
        dest = Path(args.ship_apl)
        pm.save(dest, info)
        summary = {k: {kk: v["repeat0"][kk] for kk in ("auc", "auc_ci_low", "auc_ci_high", "sensitivity",
                                                        "specificity", "n", "n_pos")} |
                   {"auc_repeats": v["auc_repeats"]} for k, v in cv["methods"].items()}
        (dest / "metrics.json").write_text(json.dumps({"method": best, "cross_validation": summary,
                                                       "n_splits": args.folds, "mil_config": mil_cfg.to_dict()},
                                                      indent=1, default=float))
        write_apl_card(dest, best, cv, pm.info)
        size = sum(p.stat().st_size for p in dest.iterdir()) / 2**20
        print(f"shipped apl ({best}) to {dest}: {size:.1f} MB, {pm.n_parameters} parameters")
    if args.update_card and shipped:
        n_params = sum(p.numel() for p in load_model(ct_dir, backend="torch").module.parameters())
        update_cell_type_card(ct_dir, shipped, cv.get("blast_oof"), n_params)
        print(f"updated {ct_dir / 'MODEL_CARD.md'}")
    for v in cv["methods"].values():
        v["oof_repeat0"] = {k: round(float(x), 5) for k, x in v["oof_repeat0"].items()}
    cv.pop("folds", None)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    out["seconds"] = round(time.time() - t0)
    path.write_text(json.dumps(out, indent=1, default=float))
    print(f"wrote {path} ({out['seconds']} s)")


if __name__ == "__main__":
    main()

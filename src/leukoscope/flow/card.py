"""MODEL_CARD.md for a flow model, written from its config, training cases and measured metrics."""

from __future__ import annotations

from collections import Counter

from leukoscope.flow.model import FlowModel


def _fmt(x: float) -> str:
    return "n/a" if x != x else f"{x:.3f}"  # NaN check without numpy


def model_card(model: FlowModel, metrics: dict, command: str = "") -> str:
    """A model card that says what the model saw, how it was evaluated and what it must not be used for."""
    cfg, clf = model.config, model.classifier
    f = cfg.features
    lines = [f"# Model card: {cfg.name}", ""]
    lines += ["Flow cytometry classifier, **AML vs normal**, one prediction per subject. Research use only: not a "
              "medical device, not clinically validated.", ""]
    lines += ["## What it reads", ""]
    if model.input == "fcs":
        lines += [
            f"- One FCS file per subject for tube(s) {list(f.tubes)}, data set {f.dataset} of multi-data-set files.",
            f"- Channels matched by `$PnN` (not marker text): {', '.join(f.channels)}.",
            "- Log-amplified channels decoded to linear values (10^(decades*x/range)); compensation: "
            f"`{f.compensation}`; transform `{f.transform}`"
            + (f" (cofactor {f.cofactor:g})" if f.transform == "arcsinh" else f" (T, M, W, A = {f.logicle_params})")
            + f"; linear channels {list(f.linear_channels)} divided by `$PnR`.",
            "- Expected panel for FlowCAP-II tube 4: FL1 CD15-FITC, FL2 CD13-PE, FL3 CD45-ECD, FL4 CD16-PC5, "
            "FL5 CD56-PC7 (Beckman Coulter Cytomics FC 500). Files of another panel or instrument are read, but the "
            "probabilities mean nothing for them.",
        ]
    else:
        lines += ["- A per-subject feature table with the columns listed in `model.json` (`feature_names`)."]
    lines += ["", "## Model", ""]
    lines += [f"- {len(model.feature_names)} features per subject: per-channel quantiles {list(f.quantiles)}"
              + (", mean and SD" if f.moments else "")
              + f", fractions of events above {list(f.thresholds)} (linear units) on the fluorescence and SS "
              f"channels, and proportions of {f.n_clusters} k-means clusters fitted on the training subjects' "
              "events." if model.input == "fcs" else f"- {len(model.feature_names)} features from the table."]
    bp = clf.info.get("best_params", {})
    kind = "RBF SVM" if clf.kind == "svm" else "L2 logistic regression"
    lines += [f"- {kind} on standardised features, class_weight `{cfg.model.class_weight}`; hyper-parameters "
              f"chosen by {clf.info.get('inner_folds')}-fold subject-level inner CV ({cfg.model.scoring}): "
              + ", ".join(f"{k} = {v:.4g}" for k, v in bp.items()) + ".",
              f"- Probabilities: Platt sigmoid fitted on the inner-CV held-out decision values "
              f"(a = {clf.platt_a:.4f}, b = {clf.platt_b:.4f}); label = the class with probability >= 0.5.",
              "- Stored as arrays (`model.safetensors`) and JSON (`model.json`); no pickle.", ""]
    lines += ["## Training data", ""]
    lines += ["FlowCAP-II / DREAM6 AML challenge (FlowRepository FR-FCM-ZZYA; Aghaeepour et al., Nature Methods "
              "10:228-238, 2013). Third-party research data, cited, not redistributed with this package.", ""]
    cases = model.training.get("cases") or []
    if cases:
        by = Counter((c["source"], c["label"]) for c in cases)
        lines += [f"- {len(cases)} subjects, one tube-4 file each: "
                  + "; ".join(f"{src}: {by[(src, 'aml')]} AML / {by[(src, 'normal')]} normal"
                              for src in sorted({c['source'] for c in cases})) + ".",
                  "- `raw` = original Beckman LMD files (30,000 events, data set 1 used); `cytodx` = flowCore "
                  "re-writes of data set 1 down-sampled to 500 events (CytoDx package example data). Subject 9 is "
                  "in both; only its raw file is used.",
                  "- The two sources differ in event count and AML share; see docs/FLOW.md for a per-source check.",
                  "- Subjects: " + ", ".join(c["subject"] for c in cases) + " (list with files in "
                  "`training_cases.json`)."]
    elif model.training.get("source"):
        src = "/".join(str(model.training["source"]).replace("\\", "/").split("/")[-2:])
        lines += [f"- Feature table `{src}`, one row per subject."]
        if src.endswith("AML_features.csv"):
            lines += ["- This is a third-party summary (repository ccyy-web/AML-flow-cytometry): mean and SD of "
                      "arcsinh(x/5) of the 40 fluorescence channels of all 8 tubes, computed with fcsparser from "
                      "channel values. How its author combined the tube files is not documented. It was not "
                      "computed by leukoscope and cannot be recomputed from the FCS files here."]
    lines += ["", "## Evaluation", ""]
    cv = metrics.get("cv")
    if cv:
        p = cv["pooled"]
        lines += [f"{cv['protocol']}; {cv['n_subjects']} subjects ({cv['n_aml']} AML). Metrics of the held-out "
                  "probabilities averaged over repeats; 95% CI of the AUC by bootstrap over subjects.", "",
                  "| metric | value |", "|---|---|",
                  f"| AUC | {_fmt(p['auc'])} (95% CI {_fmt(p['auc_ci_low'])}-{_fmt(p['auc_ci_high'])}) |",
                  f"| F1 | {_fmt(p['f1'])} |",
                  f"| sensitivity | {_fmt(p['sensitivity'])} (exact 95% CI {_fmt(p['sensitivity_ci_low'])}-"
                  f"{_fmt(p['sensitivity_ci_high'])}) |",
                  f"| specificity | {_fmt(p['specificity'])} (exact 95% CI {_fmt(p['specificity_ci_low'])}-"
                  f"{_fmt(p['specificity_ci_high'])}) |",
                  f"| accuracy | {_fmt(p['accuracy'])} |",
                  f"| TP / FP / TN / FN | {p['tp']} / {p['fp']} / {p['tn']} / {p['fn']} |", "",
                  "Across repeats: " + "; ".join(
                      f"{k} {v['mean']:.3f} +/- {v['sd']:.3f}" for k, v in cv["per_repeat"].items()) + ".", ""]
        if cv["n_subjects"] < 100:
            lines += [f"**Caution:** {cv['n_subjects']} subjects is very few; an AUC of 1.0 on them says the classes "
                      "separate in this sample, not that the model will reach it on new laboratories, instruments "
                      "or panels. The CI is wide in reality even where the bootstrap interval collapses to a "
                      "point (it cannot resample errors that never occurred); the exact intervals of sensitivity and "
                      "specificity show the real uncertainty.", ""]
    else:
        lines += ["No cross-validation was run for this directory.", ""]
    if model.input == "fcs":
        lines += ["A separate model on the 359-subject feature table (all 8 tubes, third-party summary) is evaluated "
                  "by `benchmarks/flow_cv.py`; see docs/FLOW.md. It is not this model and cannot read FCS files.", ""]
        panel = "one 5-colour panel (tube 4)"
    else:
        lines += ["This model reads feature tables only; the shipped `flow-aml` model is the one that reads FCS files.",
                  ""]
        panel = "8 tubes of one 5-colour-per-tube panel set"
    lines += ["## Limits", "",
              f"- One public data set, one instrument (Beckman Coulter FC 500), {panel}.",
              "- AML vs normal only: other leukemias, MDS, or reactive samples were never seen.",
              "- Fusion with image evidence needs weights fitted on a lab's own paired cases (docs/FLOW.md).", ""]
    if command:
        lines += ["## Reproduce", "", "```", command, "```", ""]
    return "\n".join(lines)

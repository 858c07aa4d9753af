"""Evaluation reports: metrics per image, per group and per source; ROC, confusion matrix and reliability diagram
as PNG; everything as JSON, markdown and a self-contained HTML page; and the model card."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from leukoscope.evaluate.metrics import (
    aggregate_by_group,
    expected_calibration_error,
    multiclass_metrics,
    reliability_bins,
    roc_points,
)
from leukoscope.models.modeldir import softmax


def _fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def evaluate_predictions(
    classes: Sequence[str], y: np.ndarray, logits: np.ndarray, temperature: float, samples: Sequence,
    out_dir: Path | None = None, val: tuple[np.ndarray, np.ndarray] | None = None, title: str = "evaluation",
    n_boot: int = 1000,
) -> dict:
    """Metrics for held-out predictions; writes plots and reports into ``out_dir`` when given."""
    classes = list(classes)
    y = np.asarray(y).astype(int)
    proba_raw = softmax(logits)
    proba = softmax(logits / temperature)
    groups = [s.group for s in samples]
    out: dict = {"title": title, "classes": classes, "temperature": float(temperature),
                 "per_image": multiclass_metrics(y, proba, classes, n_boot=n_boot, groups=groups)}
    out["calibration"] = {"ece_before": expected_calibration_error(y, proba_raw),
                          "ece_after": expected_calibration_error(y, proba)}
    if val is not None and len(val[0]):
        yv, lv = val
        out["calibration"]["val_ece_before"] = expected_calibration_error(yv, softmax(lv))
        out["calibration"]["val_ece_after"] = expected_calibration_error(yv, softmax(lv / temperature))
    # per group (patient / field): only where every group has one label (cell-type tasks mix labels in a patient)
    g_arr = np.asarray(groups)
    pure = all(len(set(y[g_arr == g])) == 1 for g in set(groups))
    if pure and len(set(groups)) > 1:
        names, gp = aggregate_by_group(groups, proba)
        gy = np.array([y[g_arr == g][0] for g in names])
        out["per_group"] = multiclass_metrics(gy, gp, classes, n_boot=n_boot)
        out["per_group"]["n_groups"] = len(names)
    sources = sorted({s.source for s in samples})
    if len(sources) > 1:
        out["per_source"] = {}
        for src in sources:
            m = np.array([s.source == src for s in samples])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out["per_source"][src] = multiclass_metrics(y[m], proba[m], classes, n_boot=n_boot,
                                                            groups=list(g_arr[m]))
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = write_plots(out_dir, classes, y, proba, proba_raw)
        out["plots"] = plots
        (out_dir / "evaluation.json").write_text(json.dumps(out, indent=1, default=float))
        md = markdown_report(out)
        (out_dir / "evaluation.md").write_text(md)
        (out_dir / "evaluation.html").write_text(html_report(out, out_dir))
    return out


def write_plots(out_dir: Path, classes: list[str], y: np.ndarray, proba: np.ndarray, proba_raw: np.ndarray) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    fig, ax = plt.subplots(figsize=(5, 5))
    pos = range(1, 2) if len(classes) == 2 else range(len(classes))
    for k in pos:
        if 0 < (y == k).sum() < len(y):
            fpr, tpr = roc_points(y == k, proba[:, k])
            ax.plot(fpr, tpr, label=classes[k])
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)", title="ROC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=110)
    plt.close(fig)
    plots["roc"] = "roc.png"

    cm = np.zeros((len(classes), len(classes)), int)
    for t, p in zip(y, proba.argmax(1)):
        cm[t, p] += 1
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(classes), 1 + 0.5 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png", dpi=110)
    plt.close(fig)
    plots["confusion"] = "confusion.png"

    fig, ax = plt.subplots(figsize=(5, 5))
    for pr, name in ((proba_raw, "before calibration"), (proba, "after temperature scaling")):
        b = reliability_bins(y, pr)
        ece = expected_calibration_error(y, pr)
        ax.plot(b["confidence"], b["accuracy"], "o-", label=f"{name} (ECE {ece:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="confidence", ylabel="accuracy", title="reliability", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=110)
    plt.close(fig)
    plots["reliability"] = "reliability.png"
    return plots


def _metric_rows(m: dict) -> list[tuple[str, str]]:
    rows = [("images" if "n_groups" not in m else "groups", str(m.get("n_groups", m["n"]))),
            ("accuracy", _fmt(m["accuracy"]))]
    if "binary" in m:
        b = m["binary"]
        rows += [("precision", _fmt(b["precision"])), ("recall / sensitivity", _fmt(b["recall"])),
                 ("specificity", _fmt(b["specificity"])), ("F1", _fmt(b["f1"]))]
    rows += [("macro F1", _fmt(m["macro"]["f1"])), ("weighted F1", _fmt(m["weighted"]["f1"])),
             ("ROC AUC (95% CI)", f"{_fmt(m['auc'])} ({_fmt(m['auc_ci_low'])}-{_fmt(m['auc_ci_high'])})")]
    return rows


def markdown_report(r: dict) -> str:
    lines = [f"# {r['title']}", ""]
    sections = [("Per image", r["per_image"])]
    if "per_group" in r:
        sections.append(("Per group (mean of its images' probabilities)", r["per_group"]))
    for src, m in r.get("per_source", {}).items():
        sections.append((f"Per image, {src}", m))
    for title, m in sections:
        lines += [f"## {title}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _metric_rows(m)]
        lines.append("")
    pc = r["per_image"]["per_class"]
    lines += ["## Per class (per image)", "", "| class | precision | recall | specificity | F1 | support |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {c} | {_fmt(v['precision'])} | {_fmt(v['recall'])} | {_fmt(v['specificity'])} | {_fmt(v['f1'])} "
              f"| {v['support']} |" for c, v in pc.items()]
    cal = r["calibration"]
    lines += ["", "## Calibration", "", f"Temperature {r['temperature']:.3f}. Test ECE before "
              f"{cal['ece_before']:.3f}, after {cal['ece_after']:.3f}."]
    if "plots" in r:
        lines += [""] + [f"![{k}]({v})" for k, v in r["plots"].items()]
    return "\n".join(lines) + "\n"


def html_report(r: dict, out_dir: Path) -> str:
    """Self-contained HTML (plots inlined as base64): opens offline, can be mailed."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(r['title'])}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:left}img{max-width:30em;margin:.5em}</style></head><body>",
             f"<h1>{html.escape(r['title'])}</h1>",
             f"<p>Generated {_dt.datetime.now().isoformat(timespec='seconds')}.</p>"]
    sections = [("Per image", r["per_image"])]
    if "per_group" in r:
        sections.append(("Per group", r["per_group"]))
    for src, m in r.get("per_source", {}).items():
        sections.append((f"Per image, {src}", m))
    for title, m in sections:
        parts.append(f"<h2>{html.escape(title)}</h2><table>")
        parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _metric_rows(m)]
        parts.append("</table>")
    parts.append("<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>specificity</th>"
                 "<th>F1</th><th>support</th></tr>")
    for c, v in r["per_image"]["per_class"].items():
        parts.append(f"<tr><td>{html.escape(c)}</td><td>{_fmt(v['precision'])}</td><td>{_fmt(v['recall'])}</td>"
                     f"<td>{_fmt(v['specificity'])}</td><td>{_fmt(v['f1'])}</td><td>{v['support']}</td></tr>")
    parts.append("</table>")
    cal = r["calibration"]
    parts.append(f"<h2>Calibration</h2><p>Temperature {r['temperature']:.3f}; test ECE {cal['ece_before']:.3f} "
                 f"before, {cal['ece_after']:.3f} after.</p>")
    for name, file in r.get("plots", {}).items():
        data = base64.b64encode((out_dir / file).read_bytes()).decode()
        parts.append(f"<img alt='{name}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _trained_on(t: dict, seconds: float | None) -> str:
    where = f"CUDA ({t.get('gpu') or 'GPU'}{', mixed precision' if t.get('amp') else ', float32'})" \
        if t.get("device") == "cuda" else "CPU"
    procs = f", {t['world_size']} processes (DDP)" if t.get("world_size", 1) > 1 else ""
    took = f" in {seconds:.0f} s of training" if seconds is not None else ""
    return (f"- Trained on {where}{procs}{took}, PyTorch {t.get('torch', '?')}. Retraining from the same config on "
            "other hardware gives other weights (floating-point order differs), as another seed would.")


def label_mapping(cfg, ds) -> list[str]:
    """Markdown lines saying which source labels became which class, for a multi-source two-class model."""
    if cfg.target != "binary" or len(cfg.datasets) < 2:
        return []
    from leukoscope.data.datasets import DEEPAPL_BINARY, DEEPAPL_NO_BINARY, PBC_CELL_TYPES

    known = {
        "aria": "leukemic: Early, Pre, Pro (B-ALL); healthy: Benign (hematogones)",
        "all_idb2": "leukemic: `_1` crops (ALL blasts); healthy: `_0` crops",
        "cnmc2019": "leukemic: `all` cells (B-ALL); healthy: `hem` cells (normal B precursors)",
        "pbc": f"healthy: every group ({', '.join(PBC_CELL_TYPES)}), promyelocytes in `ig` and platelets "
               "included: all come from healthy donors",
        "deepapl": "leukemic: " + ", ".join(k for k, v in DEEPAPL_BINARY.items() if v == "leukemic")
                   + "; healthy: " + ", ".join(k for k, v in DEEPAPL_BINARY.items() if v == "healthy")
                   + "; left out: " + "; ".join(DEEPAPL_NO_BINARY.values()),
    }
    return [f"- {d}: {known.get(d, 'its own binary labels')}" for d in cfg.datasets]


def write_card(out: Path, cfg, ds, split, info: dict, metrics: dict) -> None:
    """MODEL_CARD.md: data seen, split, metrics with CIs, intended use, limits."""
    sizes = {k: len(v) for k, v in split.parts.items()}
    pi = metrics["per_image"]
    lines = [
        f"# Model card: {info['name']}", "",
        f"Trained {_dt.date.today().isoformat()} by `leukoscope train` "
        "(config in `config.yaml`, split in `split.json`).",
        "",
        "## What it does",
        f"Classifies a single white-cell image into {', '.join(info['classes'])} (target `{info['target']}`), with a "
        "temperature-calibrated confidence.", "",
        "## Architecture",
        f"- `{info['spec']['model']}` on backbone `{info['spec']['backbone']}` (ImageNet weights from "
        f"`{info['weights_source']}`), input {info['preprocess']['size']} px, dropout {info['spec']['dropout']}.",
        ("- Trained: every layer (full fine-tuning, images augmented per sample on the training device)"
         if cfg.recipe.full_finetune else
         f"- Trained: the backbone's last {info['spec']['trainable_stages']} stage(s) and the head"
         + (" on cached stem features" if cfg.recipe.cache_stem else ""))
        + f"; {info.get('n_parameters', '')} parameters in all.",
        *([_trained_on(info["trained_on"], info.get("trained_seconds"))] if info.get("trained_on") else []),
        *([f"- An ensemble of {1 + len(info['members'])} such networks (seeds of this recipe on this split): it "
           "answers with the mean of their logits; the out-of-distribution score's embeddings and the heatmaps come "
           "from the first. It costs one network per member at prediction."] if info.get("members") else []),
        f"- Temperature {info['temperature']:.3f} fitted on the validation split. "
        f"Grad-CAM layer `{info['target_layer']}`.",
        *([f"- Trained on {len(info['spec']['subclasses'])} subclasses (`subclasses: {cfg.recipe.subclasses}`: "
           + ", ".join(f"`{c}`" for c in info["spec"]["subclasses"])
           + "); it answers with the classes, each class's probability being the sum of its subclasses'."]
          if info["spec"].get("subclasses") else []),
        *(["- Input crop (`crop: cutout`): an image of one cell cut out onto a black background is cropped to the "
           "square around the cell before resizing (other images are used whole); heatmaps are zero outside the crop."]
          if cfg.recipe.crop == "cutout" else []),
        *([f"- Loss on the activation maps (`cam_mask: {cfg.recipe.cam_mask}`): on training images of one cell on a "
           "black background, the share of the abnormal classes' maps outside the cell is added to the loss, so "
           "that the heatmaps of abnormal calls lie on the cell (`leukoscope.train.cam_mask`)."]
          if cfg.recipe.cam_mask else []),
        "", "## Data seen",
        f"Datasets: {', '.join(cfg.datasets)}. Groups: {ds.group_by}.",
        f"Split (stratified by class, grouped; seed {split.seed}): " + ", ".join(f"{k} {v}" for k, v in sizes.items())
        + " images. No group is on two sides.", "",
        "## Metrics on the held-out test groups", "",
        "| scope | n | accuracy | sensitivity | specificity | F1 (macro) | AUC (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name: str, m: dict) -> str:
        b = m.get("binary", {})
        return (f"| {name} | {m.get('n_groups', m['n'])} | {_fmt(m['accuracy'])} | {_fmt(b.get('sensitivity'))} | "
                f"{_fmt(b.get('specificity'))} | {_fmt(m['macro']['f1'])} | {_fmt(m['auc'])} "
                f"({_fmt(m['auc_ci_low'])}-{_fmt(m['auc_ci_high'])}) |")

    lines.append(row("all test images", pi))
    if "per_group" in metrics:
        lines.append(row("per group", metrics["per_group"]))
    for src, m in metrics.get("per_source", {}).items():
        lines.append(row(f"images from {src}", m))
    cal = metrics["calibration"]
    lines += [
        "", f"Calibration (test): ECE {cal['ece_before']:.3f} before, {cal['ece_after']:.3f} after temperature "
        "scaling.",
        "Sensitivity/specificity are for the positive class (second class) at probability 0.5; n/a for more classes.",
        "AUC CIs are percentile bootstraps over groups (1000 resamples).", "",
    ]
    op = metrics.get("operating_point")
    if op:
        lines += [
            "## Operating point",
            f"The model answers `{info['classes'][1]}` when its calibrated probability reaches {op['threshold']:.3f}, "
            f"the threshold where {op['aim']} (stored in `model.json` as `threshold`).", "",
            "| part | n | sensitivity | specificity | accuracy |", "|---|---|---|---|---|",
            *[f"| {part} | {m['n']} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | {m['accuracy']:.3f} |"
              for part, m in (("validation", op["val"]), ("test", op["test"]))], "",
        ]
    mapping = label_mapping(cfg, ds)
    if mapping:
        lines += ["## Label mapping", *mapping, ""]
    lines += [
        "The test part was scored once, when this model was written; nothing was chosen on it.", "",
        "## Intended use",
        "Research and a second reader for trained staff. It is not a medical device and has not been validated "
        "clinically. It answers for one cell at a time; a diagnosis is made for a patient by people.", "",
        "## Limits",
        "- Trained on small public datasets with their own stains, scanners and magnifications; expect lower accuracy "
        "on other labs' images until re-validated there.",
        "- Aria, ALL-IDB and PBC have no patient ids. Aria is held out as contiguous ranges of image numbers at the "
        "end of each class, ALL-IDB by source field, PBC by image: held-out images may still share patients with "
        "training (optimistic estimates).",
        "- Test sets are small: read the confidence intervals, not the point estimates.",
    ]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")

"""docs/TRUST.md from benchmarks/results/ood_shifts.json and quality_checks.json: no number in it is typed by hand.

    python benchmarks/trust_report.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

GUIDE = """# When not to trust an answer

A second reader has to say "I don't know this" instead of guessing. Every answer of a cell model comes with two
kinds of caution:

- **`ood`**: the image is unlike the images the model was trained on (out of distribution). The class is still
  given, but it is not to be trusted. `ood_score` says how unusual the image is (higher is more unusual); the flag is
  set above the threshold that leaves 95% of the model's validation images unflagged, so about 1 in 20 ordinary
  images is flagged too.
- **Image-quality warnings**, each with a code and a sentence: `out_of_focus`, `overexposed`, `underexposed`,
  `stain` (colour far from every training stain), `cell_size` (the cell's size does not fit the model's
  magnification), `whole_field` (a whole smear field given to a single-cell model) and, for `scan`, `single_cell`
  (one cell given to the field scanner).

Where they appear:

| where | what |
|---|---|
| `leukoscope predict` | CSV columns `ood` (true / false), `ood_score`, `warnings` (codes joined by `;`); a count |
| Python API | `leukoscope.predict(...)` returns `.ood`, `.ood_score`, `.warnings` and `.trusted` |
| REST API | `ood`, `ood_score`, `ood_threshold` and `warnings` in `/v1/predict` and `/v1/explain` |
| web page | a visible caution on the result card; the downloaded report has the same columns |
| `leukoscope scan` | `ood`, `ood_score` per cell; `ood_cells`, `warnings` per field; flagged cells are marked `?` |
| `leukoscope diagnose` | `ood_share`: the share of a patient's cells that the cell-type model flags |

The quality checks cost about 20 ms per image on one CPU core, more than the network itself; for a large batch
where speed matters more, `leukoscope predict --no-quality-checks` skips them (the `warnings` column then says
`unchecked`; the `ood` flag stays). `python benchmarks/startup.py` measures both.

## Your own model

Training fits both at its end, from the model's own split: the detector on the embeddings of the training part
(`ood.npz`), its threshold on the validation part, and the quality reference on the training images
(`quality.json`). For a model directory trained before, or to try another score:

    leukoscope ood --model runs/my-model                          # knn (the default)
    leukoscope ood --model runs/my-model --method mahalanobis      # or energy, msp, knn+msp, mahalanobis+msp

The model card gets a section "When not to trust an answer" with the share of its test part flagged and the
accuracy of the flagged and unflagged answers.

## How the score was chosen

"""


def fmt(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def ood_tables(doc: dict) -> list[str]:
    methods = doc["methods"]
    lines = [f"`python benchmarks/ood_shifts.py` on `{doc['model']}` (weights {doc['weights_sha256'][:12]}). "
             "Each method is fitted on the training part's embeddings, with its threshold keeping "
             f"{doc['keep']:.0%} of the validation part; each shift is scored against the model's own test part. "
             "AUROC: how well the score tells the shift from the test part (0.5: not at all); flagged: the share "
             "of the shift's images flagged.", "",
             "| | " + " | ".join(f"{m} AUROC | {m} flagged" for m in methods) + " |",
             "|---" * (2 * len(methods) + 1) + "|",
             "| test part (in distribution) | " + " | ".join(
                 f"- | {doc['in_distribution'][m]['flagged']:.1%}" for m in methods) + " |"]
    for name, row in doc["shifts"].items():
        lines.append(f"| {name.replace('_', ' ')} (n={row[methods[0]]['n']}) | " + " | ".join(
            f"{row[m]['auroc']:.3f} | {row[m]['flagged']:.1%}" for m in methods) + " |")
    for src, row in doc["held_out_sources"].items():
        lines.append(f"| {src} held out (n={row['n']}) | " + " | ".join(
            f"{row[m]['auroc']:.3f} | {row[m]['flagged']:.1%}" for m in methods) + " |")
    lines += ["", "Summary per method (mean AUROC over every shift and held-out source above):", "",
              "| method | mean AUROC | non-blood flagged | test part flagged | on every held-out source, unflagged "
              "answers beat all answers |", "|---|---|---|---|---|"]
    for m, s in doc["summary"].items():
        lines.append(f"| {m} | {s['mean_auroc']:.3f} | {s['not_blood_flagged']:.1%} | {s['test_flagged']:.1%} | "
                     f"{'yes' if s['held_out_unflagged_beats_all'] else 'no'} |")
    return lines


def together_table(doc: dict) -> list[str]:
    wq = doc.get("with_quality")
    if not wq:
        return []
    lines = ["## The flag and the quality warnings together", "",
             f"A user is told not to trust an answer when it is flagged (`{wq['method']}`) or warned about. The "
             "same images as above:", "",
             "| images | n | flagged | quality warning | flagged or warned |", "|---|---|---|---|---|",
             f"| test part (in distribution) | {wq['test_part']['n']} | "
             f"{doc['in_distribution'][wq['method']]['flagged']:.1%} | {wq['test_part']['warned']:.1%} | "
             f"{wq['test_part']['flagged_or_warned']:.1%} |"]
    for name, r in wq["shifts"].items():
        lines.append(f"| {name.replace('_', ' ')} | {r['n']} | {doc['shifts'][name][wq['method']]['flagged']:.1%} | "
                     f"{r['warned']:.1%} | {r['flagged_or_warned']:.1%} |")
    return lines + [""]


def other_models(docs: list[dict]) -> list[str]:
    """The other shipped models' own detectors (their stored method) on the same kinds of shift."""
    names = sorted({k for d in docs for k in d["shifts"]}, key=lambda k: (not k.startswith("not"), k))
    lines = ["## The other shipped models", "",
             "`python benchmarks/ood_shifts.py --model NAME` (no source held out): the share flagged by each model's "
             "stored detector, on its own test part and on each shift.", "",
             "| model | method | test part | " + " | ".join(n.replace("_", " ") for n in names) + " |",
             "|---" * (len(names) + 3) + "|"]
    for d in docs:
        m = d["shipped_method"]
        cells = [f"{d['shifts'][n][m]['flagged']:.1%}" if n in d["shifts"] else "-" for n in names]
        lines.append(f"| `{d['model']}` | {m} | {d['in_distribution'][m]['flagged']:.1%} | " + " | ".join(cells)
                     + " |")
    return lines + [""]


def held_out_table(doc: dict, method: str) -> list[str]:
    lines = ["## Sources the model never saw", "",
             f"Each source held out in turn: a model trained on the other sources, with its `{method}` detector, "
             "answers every image of the held-out source (at most 600). Accuracy of all its answers, of the "
             "unflagged and of the flagged ones:", "",
             "| held-out source | n | flagged | accuracy, all | unflagged | flagged |", "|---|---|---|---|---|---|"]
    for src, row in doc["held_out_sources"].items():
        s = row[method]["selective"]
        lines.append(f"| {src} | {row['n']} | {s['flagged']:.1%} | {fmt(s['accuracy_all'])} | "
                     f"{fmt(s['accuracy_unflagged'])} | {fmt(s['accuracy_flagged'])} |")
    lines += ["", "![selective prediction](../benchmarks/results/ood_selective.png)", "",
              "Accuracy against the share of images answered, the most unusual left out first "
              f"(`{method}` score).", ""]
    return lines


def quality_tables(doc: dict) -> list[str]:
    ref = doc["reference"]
    sources = list(ref["fitted_on"])
    lines = ["## Image-quality warnings", "",
             f"`python benchmarks/quality_checks.py` ({doc['date']}): the reference is fitted on "
             f"{sum(ref['fitted_on'].values())} training images of `{Path(ref['model_dir']).name}`'s split "
             f"({', '.join(f'{s} {n}' for s, n in ref['fitted_on'].items())}) and calibrated on "
             f"{sum(ref['calibrated_on'].values())} of its validation images; every share below is of images of its "
             "test part (other patients), as given or altered by the benchmark itself.", "",
             "| | " + " | ".join(sources) + " |", "|---" * (len(sources) + 1) + "|",
             "| real test images with any warning (false alarms) | " + " | ".join(
                 f"{doc['real_heldout'][s]['any']:.1%} (n={doc['real_heldout'][s]['n']})" for s in sources) + " |"]
    for name, row in doc["synthetic_shifts"].items():
        exp = next(iter(row.values())).get("expected", "")
        lines.append(f"| {name}: warned `{exp}` | " + " | ".join(
            fmt(row[s].get("warned_expected") if s in row else None, ".0%") for s in sources) + " |")
    lines += ["", "A whole smear field given to a single-cell model (`whole_field`), and one cell given to the field "
              "scanner (`single_cell`):", "", "| images | n | warned with the expected code |", "|---|---|---|"]
    for src, kinds in doc["whole_fields_to_cell_check"].items():
        for kind, r in kinds.items():
            lines.append(f"| {src} field, {kind}, to a cell model | {r['n']} | {fmt(r['warned_expected'], '.0%')} |")
    for src, r in doc["check_field"]["cell_crops_single_cell"].items():
        lines.append(f"| {src} cell crop, to the field scanner | {r['n']} | {fmt(r['warned_expected'], '.0%')} |")
    for src, r in doc["check_field"]["real_fields"].items():
        lines.append(f"| {src} real field, to the field scanner (false alarms) | {r['n']} | {fmt(r['any'], '.0%')} "
                     "any warning |")
    lines += ["", "What the checks miss (below 90% of the altered images): " +
              "; ".join(doc.get("targets_missed", [])) + ".", ""]
    return lines


def main() -> None:
    lines = GUIDE.splitlines()
    ood = RESULTS / "ood_shifts.json"
    if ood.exists():
        doc = json.loads(ood.read_text())
        method = doc["shipped_method"]
        best = max(doc["summary"], key=lambda m: doc["summary"][m]["mean_auroc"])
        why = (f"the highest mean AUROC ({doc['summary'][method]['mean_auroc']:.3f})" if best == method else
               f"not the highest mean AUROC (that is `{best}`)")
        src = doc.get("held_out_from")
        note = ([f"The held-out-source rows come from the run recorded in `{Path(src['path']).name}` (the "
                 "leave-one-source-out models are not shipped); the other rows from this run."] if src else [])
        lines += ood_tables(doc) + ["", f"The shipped models use `{method}`: {why}. The method was chosen on this "
                                    "table itself (no other set of shifts was kept apart for the choice), so the "
                                    "chosen method's figures here are somewhat optimistic.", *note, ""]
        lines += together_table(doc) + held_out_table(doc, method)
    others = sorted(RESULTS.glob("ood_shifts_*.json"))
    others = [json.loads(p.read_text()) for p in others if p.name != "ood_shifts_loso.json"]
    if others:
        lines += other_models(others)
    q = RESULTS / "quality_checks.json"
    if q.exists():
        lines += quality_tables(json.loads(q.read_text()))
    (ROOT / "docs" / "TRUST.md").write_text("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    main()

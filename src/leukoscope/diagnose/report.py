"""Self-contained HTML reports: one page per patient (probability, differential count, the cells that weighed most
with their Grad-CAM heatmaps) and an index page. Images are inlined, so a page opens offline and can be mailed."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import re
from pathlib import Path

import cv2
import numpy as np

from leukoscope.data.images import read_image
from leukoscope.diagnose.core import Diagnoser, PatientResult
from leukoscope.errors import ImageReadError

log = logging.getLogger(__name__)

_STYLE = ("body{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
          ".bar{display:inline-block;height:.8em;background:#4a7ab5}.cells{display:flex;flex-wrap:wrap;gap:1em}"
          ".cell{border:1px solid #ccc;padding:.5em;width:17em;font-size:.85em}.cell img{width:8em;height:8em}"
          ".note{color:#666;font-size:.9em}.big{font-size:1.4em}")


def _png(rgb: np.ndarray, side: int = 192) -> str:
    img = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".png", img[..., ::-1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "patient"


def patient_page(r: PatientResult, d: Diagnoser, top_k: int = 8, heatmaps: bool = True) -> str:
    """The HTML of one patient's report."""
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(r.patient)}: {r.label}</title>"
             f"<style>{_STYLE}</style></head><body>",
             f"<h1>{e(r.patient)}</h1>",
             f"<p class='big'><b>{r.label}</b> &mdash; P(APL) = {r.p_apl:.3f}, P(AML) = {r.p_aml:.3f} "
             f"(threshold {d.model.threshold:.2f}), from {r.n_cells} cells.</p>",
             f"<p class='note'>Patient model <code>{e(d.model.name)}</code> (method <code>{e(r.method)}</code>); "
             f"cell types from <code>{e(d.cell_model.name)}</code>. Source: {e(r.source)}. Research use only: not a "
             "medical device; a diagnosis is made by people from the whole work-up (genetics, flow cytometry).</p>"]
    if r.ood_share is not None and r.ood_share > 0:
        parts.append(f"<p class='note'><b>{r.ood_share:.0%} of the cells</b> are unlike the cells the cell-type model "
                     "was trained on (out-of-distribution flag): the more there are, the less this answer is to be "
                     "trusted.</p>")
    if r.skipped:
        parts.append(f"<p><b>{len(r.skipped)} unreadable file(s) skipped:</b></p><ul>")
        parts += [f"<li>{e(p)}: {e(reason)}</li>" for p, reason in r.skipped]
        parts.append("</ul>")
    diff = r.differential()
    mean_p = r.cell_proba.mean(0) if r.n_cells else np.zeros(len(r.cell_types))
    parts.append("<h2>Differential count (cell-type model)</h2><table><tr><th>cell type</th><th>cells</th>"
                 "<th>%</th><th></th><th>mean probability</th></tr>")
    for k, (c, n) in enumerate(diff.items()):
        pct = 100 * n / max(r.n_cells, 1)
        parts.append(f"<tr><td>{e(c)}</td><td>{n}</td><td>{pct:.1f}</td><td><span class='bar' "
                     f"style='width:{pct * 2:.0f}px'></span></td><td>{mean_p[k]:.3f}</td></tr>")
    parts.append("</table><p class='note'>Counts are the cell-type model's most likely class per cell; the cells "
                 "given are whatever the user selected, not necessarily a full 100-cell differential.</p>")
    idx = r.top_cells(top_k)
    parts.append(f"<h2>The {len(idx)} cells that weighed most</h2>"
                 f"<p class='note'>Ranked by {e(r.weight_kind)}. 'Cell alone' is how APL-like the model finds the "
                 "cell on its own. The heatmap (Grad-CAM) shows where in the cell that score came from, for the "
                 f"patient's label ({r.label}).</p>")
    note = ""
    if heatmaps:
        try:
            import leukoscope.explain  # noqa: F401
        except ImportError as exc:
            heatmaps, note = False, f"Heatmaps are not available ({exc})."
    else:
        note = "Heatmaps were not requested."
    if note:
        parts.append(f"<p class='note'>{e(note)}</p>")
    parts.append("<div class='cells'>")
    for i in idx:
        path = r.paths[i]
        try:
            rgb = read_image(path)
        except ImageReadError as exc:  # changed since it was read: say so, keep going
            parts.append(f"<div class='cell'>{e(str(path))}: {e(exc.reason)}</div>")
            continue
        k = int(r.cell_proba[i].argmax())
        imgs = f"<img alt='cell' src='{_png(rgb)}'>"
        if heatmaps:
            from leukoscope.explain import blend

            heat = d.heatmap(rgb, target=r.label)
            imgs += f"<img alt='Grad-CAM' src='{_png(blend(rgb, heat))}'>"
        parts.append(f"<div class='cell'>{imgs}<br><b>{e(r.cell_types[k])}</b> ({r.cell_proba[i, k]:.2f})<br>"
                     f"weight {r.weights[i]:.3f}; cell alone P(APL) {r.cell_scores[i]:.2f}<br>"
                     f"<span class='note'>{e(path.name)}</span></div>")
    parts.append("</div>")
    parts.append(f"<p class='note'>Generated {_dt.datetime.now().isoformat(timespec='seconds')} by "
                 "<code>leukoscope diagnose</code>.</p></body></html>")
    return "\n".join(parts)


def write_reports(results: list[PatientResult], d: Diagnoser, out_dir: str | Path, top_k: int = 8,
                  heatmaps: bool = True) -> Path:
    """One HTML page per patient and ``index.html`` linking them; returns the index path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in results:
        name = f"{_safe(r.patient)}.html"
        (out / name).write_text(patient_page(r, d, top_k, heatmaps))
        diff = r.differential()
        top_types = ", ".join(f"{c} {n}" for c, n in sorted(diff.items(), key=lambda kv: -kv[1])[:3] if n)
        rows.append(f"<tr><td><a href='{html.escape(name)}'>{html.escape(r.patient)}</a></td><td>{r.label}</td>"
                    f"<td>{r.p_apl:.3f}</td><td>{r.n_cells}</td><td>{len(r.skipped)}</td>"
                    f"<td>{html.escape(top_types)}</td></tr>")
    index = out / "index.html"
    index.write_text("\n".join([
        f"<!doctype html><html><head><meta charset='utf-8'><title>leukoscope diagnose</title><style>{_STYLE}"
        "</style></head><body><h1>Patients</h1>",
        f"<p class='note'>Patient model <code>{html.escape(d.model.name)}</code>; research use only.</p>",
        "<table><tr><th>patient</th><th>label</th><th>P(APL)</th><th>cells</th><th>skipped</th>"
        "<th>most frequent cell types</th></tr>", *rows, "</table></body></html>"]))
    return index

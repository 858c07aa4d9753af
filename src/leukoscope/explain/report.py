"""Explanation files for many images, and ``index.html``: a self-contained offline report.

For each readable image ``<stem>.overlay.png``, ``<stem>.heatmap.npy`` and ``<stem>.json`` are written (stems that
repeat get ``-2``, ``-3``, ...). ``index.html`` embeds its thumbnails as data URIs, so it needs no network and no other
file; its links to the full-size overlays work while the folder stays together.
"""

from __future__ import annotations

import base64
import html
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from leukoscope.data.images import read_image
from leukoscope.errors import ImageReadError
from leukoscope.explain.core import as_model, explain
from leukoscope.explain.overlay import blend
from leukoscope.explain.record import method_faithfulness
from leukoscope.models.modeldir import LoadedModel

THUMB = 160


def _unique_stem(stem: str, used: set[str]) -> str:
    name, i = stem, 1
    while name in used:
        i += 1
        name = f"{stem}-{i}"
    used.add(name)
    return name


def write_explanations(model: LoadedModel | str | Path | None, paths: Iterable[str | Path], out_dir: str | Path,
                       method: str = "gradcam", target_class: int | str | None = None, layer: str | None = None,
                       html_report: bool = True, progress: bool = False) -> list[dict]:
    """Explain every image and write its overlay, heatmap and JSON into ``out_dir`` (plus ``index.html``).

    Args:
        model: a loaded model, a shipped model name or a model directory.
        paths: image files, folders (searched recursively) or globs.
        method, target_class, layer: see :func:`leukoscope.explain.explain`.
        html_report: also write ``index.html``.
        progress: show a progress bar on stderr.

    Returns:
        For each image, the JSON written for it (with ``files``: the names written into ``out_dir``), or
        ``{"path": ..., "error": reason}`` when it could not be read; inputs that matched nothing come first, with an
        error too. Unreadable inputs never stop the rest.
    """
    from tqdm import tqdm

    from leukoscope.predict import collect_paths

    model = as_model(model)
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, problems = collect_paths(paths)
    records: list[dict] = [{"path": p, "error": reason} for p, reason in problems]
    used: set[str] = set()
    thumbs: dict[int, tuple[str, str]] = {}
    for path in tqdm(files, desc=f"explaining ({method})", unit="img", disable=not progress, leave=False):
        try:
            rgb = read_image(path)
        except ImageReadError as exc:
            records.append({"path": str(path), "error": exc.reason})
            continue
        exp = explain(rgb, model, method=method, target_class=target_class, layer=layer)
        stem = _unique_stem(path.stem, used)
        names = {"overlay": f"{stem}.overlay.png", "heatmap": f"{stem}.heatmap.npy", "json": f"{stem}.json"}
        cv2.imwrite(str(out / names["overlay"]), exp.overlay[..., ::-1])
        np.save(out / names["heatmap"], exp.heatmap.astype(np.float32))
        rec = exp.to_dict()
        rec.update(path=str(path), stem=stem, files=names, model_path=str(model.path),
                   weights_sha256=model.info.get("weights_sha256", ""))
        (out / names["json"]).write_text(json.dumps(rec, indent=1))
        if html_report:
            thumbs[len(records)] = (_data_uri(rgb), _data_uri(blend(rgb, exp.heatmap)))
        records.append(rec)
    if html_report:
        (out / "index.html").write_text(index_html(records, thumbs, model, method), encoding="utf-8")
    return records


def _data_uri(rgb: np.ndarray) -> str:
    h, w = rgb.shape[:2]
    f = THUMB / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA) if f < 1 else rgb
    ok, buf = cv2.imencode(".jpg", small[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
        raise RuntimeError("could not encode a thumbnail")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.3rem;margin:0 0 .3rem} .meta{color:#555;font-size:.9rem;margin-bottom:1rem}
table{border-collapse:collapse;width:100%} th,td{border-bottom:1px solid #ddd;padding:.4rem;text-align:left;
vertical-align:middle} th{background:#f4f4f4;position:sticky;top:0} th.sort{cursor:pointer;user-select:none}
th.sort:after{content:" \\2195";color:#999} img{display:block;max-width:160px;max-height:160px}
.bar{background:#eee;width:160px;height:12px;border-radius:3px;overflow:hidden}
.bar>div{height:100%;background:#3465a4} .probs{font-size:.85rem;color:#444} .err{color:#a40000}
.note{font-size:.85rem;color:#555;max-width:60rem}
.warn{color:#8a4b00;background:#fff4e0;padding:.3rem .5rem;border-left:3px solid #e0a030}
"""

_JS = """
function sortBy(col, numeric){
  const t=document.getElementById('results'), rows=[...t.tBodies[0].rows];
  const dir=(t.dataset.col==col && t.dataset.dir=='desc')?'asc':'desc';
  t.dataset.col=col; t.dataset.dir=dir;
  rows.sort((a,b)=>{let x=a.cells[col].dataset.v, y=b.cells[col].dataset.v;
    if(numeric){x=parseFloat(x); y=parseFloat(y);} const c=x<y?-1:(x>y?1:0); return dir=='asc'?c:-c;});
  rows.forEach(r=>t.tBodies[0].appendChild(r));
}
"""


def index_html(records: list[dict], thumbs: dict[int, tuple[str, str]], model: LoadedModel, method: str) -> str:
    """The report page: one row per explained image (sortable by confidence), then the files that failed."""
    ok = [(i, r) for i, r in enumerate(records) if "error" not in r]
    bad = [r for r in records if "error" in r]
    rows = []
    for i, r in sorted(ok, key=lambda ir: -ir[1]["confidence"]):
        orig, heat = thumbs.get(i, ("", ""))
        esc = html.escape
        probs = "<br>".join(f"{esc(c)}: {p:.3f}" for c, p in r["probabilities"].items())
        bbox = r["hottest_region"]["bbox"]
        rows.append(
            f"<tr><td data-v=\"{esc(r['path'])}\">{esc(Path(r['path']).name)}<div class=probs>"
            f"{esc(r['path'])}</div></td>"
            f"<td><img alt=\"image\" src=\"{orig}\"></td>"
            f"<td><a href=\"{esc(r['files']['overlay'])}\"><img alt=\"heatmap\" src=\"{heat}\"></a></td>"
            f"<td data-v=\"{esc(r['label'])}\"><b>{esc(r['label'])}</b></td>"
            f"<td data-v=\"{r['confidence']:.6f}\">{100 * r['confidence']:.1f}%<div class=bar><div style=\"width:"
            f"{100 * r['confidence']:.1f}%\"></div></div></td>"
            f"<td class=probs>{probs}</td>"
            f"<td class=probs>explains '{esc(r['explained_class'])}'<br>hottest region x {bbox[0]}-{bbox[2]}, "
            f"y {bbox[1]}-{bbox[3]}</td></tr>")
    fails = "".join(f"<li><code>{html.escape(str(r['path']))}</code>: {html.escape(str(r['error']))}</li>" for r in bad)
    title = f"leukoscope explanations: {html.escape(model.name)}"
    method_title = html.escape(ok[0][1]["method_title"]) if ok else html.escape(method)
    kinds = {r[1].get("faithfulness", {}).get("kind") for r in ok}  # one kind of image: its own verdict
    faith = method_faithfulness(model.path, ok[0][1]["method"] if ok else method,
                                kinds.pop() if len(kinds) == 1 else None)
    faith_cls = "note" if faith["verdict"] == "passes" else "note warn"
    faith_html = (f"<p class=\"{faith_cls}\" id=faithfulness>Faithfulness of this method on this model "
                  f"({html.escape(faith['verdict'])}): {html.escape(faith['note'])}.</p>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>
<body><h1>{title}</h1>
<div class=meta>model <code>{html.escape(str(model.path))}</code>; classes {html.escape(', '.join(model.classes))};
method {method_title}; {len(ok)} image(s) explained, {len(bad)} unreadable.</div>
<p class=note>Confidence is the model's calibrated probability of its predicted class. The heatmap shows where the
network's evidence for the explained class lies (red = most); it is not a segmentation and not a diagnosis. A research
tool: results must be reviewed by a qualified person.</p>
{faith_html}
<table id=results data-col=4 data-dir=desc><thead><tr><th class=sort onclick="sortBy(0,false)">image</th>
<th>original</th><th>heatmap</th>
<th class=sort onclick="sortBy(3,false)">class</th><th class=sort onclick="sortBy(4,true)">confidence</th>
<th>probabilities</th><th>explanation</th></tr></thead><tbody>
{''.join(rows)}
</tbody></table>
{f'<h2 class=err>Unreadable ({len(bad)})</h2><ul>{fails}</ul>' if bad else ''}
<script>{_JS}</script></body></html>
"""


def report_failures(records: list[dict], prog: str = "leukoscope explain") -> int:
    """Print each failed input on stderr; return how many failed."""
    bad = [r for r in records if "error" in r]
    for r in bad:
        print(f"{prog}: cannot read {r['path']}: {r['error']}", file=sys.stderr)
    return len(bad)

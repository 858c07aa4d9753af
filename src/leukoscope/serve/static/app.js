// leukoscope's web page: drop images, see class + confidence + heatmap (cells) or boxed white cells (fields),
// download the session's results as CSV or a self-contained HTML report. No framework, nothing loaded from elsewhere.
"use strict";

(() => {
  const FIELD_MIN_SIDE = 600;  // auto mode: an image this large (longest side, px) is a whole field, not one cell
  const $ = (sel, root = document) => root.querySelector(sel);
  const els = {
    model: $("#model-select"), mode: $("#mode-select"), explain: $("#explain-toggle"), modelInfo: $("#model-info"),
    drop: $("#drop-zone"), input: $("#file-input"), results: $("#results"), summary: $("#summary"),
    csv: $("#download-csv"), html: $("#download-html"), clear: $("#clear-results"), template: $("#result-template"),
  };
  const session = [];  // one entry per image: {id, file, mode, model, status, data, error, el, time}
  let models = [];
  let queue = Promise.resolve();
  let nextId = 1;

  const pct = (p) => `${(100 * p).toFixed(1)}%`;
  const dataUrl = (img) => `data:${img.media_type};base64,${img.data}`;

  // ---------------------------------------------------------------------------------------------------------------
  async function loadModels() {
    try {
      const r = await fetch("/v1/models");
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      models = await r.json();
    } catch (err) {
      els.modelInfo.textContent = `cannot list the models: ${err.message}`;
      return;
    }
    els.model.replaceChildren(...models.map((m) => {
      const o = document.createElement("option");
      o.value = m.name;
      o.textContent = m.name;
      o.selected = m.default;
      return o;
    }));
    showModelInfo();
  }

  function showModelInfo() {
    const m = models.find((x) => x.name === els.model.value);
    if (!m) return;
    const perImage = m.metrics && m.metrics.per_image;
    const acc = perImage && typeof perImage.accuracy === "number" ? `, held-out accuracy ${pct(perImage.accuracy)}` : "";
    els.modelInfo.textContent = `classes: ${m.classes.join(", ")} (${m.backend}${acc})`;
  }

  // ---------------------------------------------------------------------------------------------------------------
  async function imageSide(file) {
    if (typeof createImageBitmap !== "function") return null;
    try {
      const bmp = await createImageBitmap(file);
      const side = Math.max(bmp.width, bmp.height);
      bmp.close();
      return side;
    } catch {
      return null;  // e.g. TIFF, which browsers do not decode: the server will
    }
  }

  async function chooseMode(file) {
    if (els.mode.value !== "auto") return els.mode.value;
    const side = await imageSide(file);
    return side !== null && side >= FIELD_MIN_SIDE ? "field" : "cell";
  }

  async function post(entry) {
    const fd = new FormData();
    fd.append("file", entry.file, entry.file.name);
    fd.append("model", entry.model);
    fd.append("include_image", "true");
    let url;
    if (entry.mode === "field") {
      url = "/v1/scan";
      fd.append("gradcam", entry.explain ? "true" : "false");
    } else {
      url = entry.explain ? "/v1/explain" : "/v1/predict";
    }
    const r = await fetch(url, { method: "POST", body: fd });
    let body;
    try {
      body = await r.json();
    } catch {
      body = { detail: `HTTP ${r.status} ${r.statusText}` };
    }
    if (!r.ok) {
      const d = body.detail;
      throw new Error(`${r.status}: ${typeof d === "string" ? d : JSON.stringify(d)}`);
    }
    return body;
  }

  function addFiles(files) {
    for (const file of files) {
      const el = els.template.content.firstElementChild.cloneNode(true);
      const entry = { id: nextId++, file, mode: null, model: els.model.value, explain: els.explain.checked,
                      status: "pending", data: null, error: null, el, time: new Date().toISOString() };
      el.dataset.id = String(entry.id);
      $(".filename", el).textContent = file.name;
      els.results.prepend(el);
      session.push(entry);
      queue = queue.then(() => run(entry));  // one request at a time: the server is shared by the whole lab
    }
    updateSummary();
  }

  async function run(entry) {
    const el = entry.el;
    try {
      entry.mode = await chooseMode(entry.file);
      $(".status", el).textContent = entry.mode === "field" ? "finding white cells\u2026" : "classifying\u2026";
      entry.data = await post(entry);
      entry.status = "done";
      if (entry.mode === "field") renderField(entry); else renderCell(entry);
    } catch (err) {
      entry.status = "error";
      entry.error = err.message;
      $(".status", el).textContent = err.message;
      $(".status", el).classList.add("error");
    }
    el.dataset.status = entry.status;
    el.dataset.mode = entry.mode || "";
    updateSummary();
  }

  // ---------------------------------------------------------------------------------------------------------------
  function setView(entry, showOverlay) {
    const el = entry.el;
    const img = $(".view", el);
    const d = entry.data;
    img.src = dataUrl(showOverlay && d.overlay ? d.overlay : d.image);
    img.alt = `${entry.file.name}${showOverlay ? " with the overlay" : ""}`;
    el.dataset.view = showOverlay ? "overlay" : "image";
    $(".boxes", el).hidden = showOverlay;
  }

  function probRows(tbody, probabilities, label, caption) {
    const table = tbody.closest("table");
    if (table.caption) table.caption.remove();
    if (caption) table.createCaption().textContent = caption;
    tbody.replaceChildren(...Object.entries(probabilities).map(([cls, p]) => {
      const tr = document.createElement("tr");
      if (cls === label) tr.className = "top";
      const a = document.createElement("td");
      a.textContent = cls;
      const b = document.createElement("td");
      b.textContent = pct(p);
      tr.append(a, b);
      return tr;
    }));
  }

  function renderCell(entry) {
    const el = entry.el;
    const d = entry.data;
    $(".status", el).textContent = "";
    $(".outcome", el).hidden = false;
    $(".label", el).textContent = d.label;
    $(".confidence", el).textContent = pct(d.confidence);
    el.dataset.label = d.label;
    el.dataset.confidence = String(d.confidence);
    const bar = $(".bar", el);
    bar.setAttribute("aria-valuenow", (100 * d.confidence).toFixed(1));
    $(".bar-fill", el).style.width = `${(100 * d.confidence).toFixed(2)}%`;
    probRows($(".probs tbody", el), d.probabilities, d.label, "calibrated probability");
    const hasOverlay = Boolean(d.overlay);
    const sw = $(".heatmap-switch", el);
    sw.hidden = !hasOverlay;
    $(".switch-text", el).textContent = "heatmap";
    $(".heatmap-toggle", el).checked = hasOverlay;
    setView(entry, hasOverlay);
    const region = d.hottest_region ? `; hottest region ${d.hottest_region.bbox.join(", ")}` : "";
    $(".meta", el).textContent = `${d.model} (${d.backend}) \u00b7 ${d.image_size.join("\u00d7")} px` +
      `${d.method ? ` \u00b7 ${d.method}` : ""}${region} \u00b7 audit #${d.audit_id}`;
    showTrust(el, d.ood, d.warnings);
    const faith = $(".faithfulness", el);
    if (faith) {
      // only a heatmap method that did not pass its faithfulness test on this model gets a visible note
      const f = d.faithfulness;
      faith.hidden = !(f && f.verdict && f.verdict !== "passes");
      faith.textContent = faith.hidden ? "" : `Heatmap caution (${f.verdict}): ${f.note}.`;
    }
  }

  // An answer the model should not be trusted with: unlike its training images, or an image-quality warning.
  function showTrust(el, ood, warnings) {
    const t = $(".trust", el);
    const notes = [];
    if (ood) notes.push("This image is unlike the images the model was trained on: do not trust this answer.");
    for (const w of warnings || []) notes.push(w.message);
    t.hidden = notes.length === 0;
    t.textContent = notes.join(" ");
    el.dataset.ood = String(Boolean(ood));
  }

  function renderField(entry) {
    const el = entry.el;
    const d = entry.data;
    $(".status", el).textContent = "";
    $(".outcome", el).hidden = false;
    $(".label-line", el).hidden = true;
    $(".bar", el).hidden = true;
    el.dataset.cells = String(d.white_cells);
    el.dataset.abnormal = String(d.abnormal_cells);
    const ci = d.abnormal_share_ci95 ? `, 95% CI ${pct(d.abnormal_share_ci95[0])}-${pct(d.abnormal_share_ci95[1])}` : "";
    const share = d.abnormal_share === null ? "" : ` (${pct(d.abnormal_share)}${ci})`;
    const fs = $(".field-summary", el);
    fs.hidden = false;
    fs.textContent = `${d.white_cells} white cell${d.white_cells === 1 ? "" : "s"}, ${d.abnormal_cells} abnormal${share}` +
      (d.ood_cells ? `, ${d.ood_cells} unlike the training cells` : "");
    const oodNote = d.ood_cells ? [{ message: `${d.ood_cells} cell${d.ood_cells === 1 ? " is" : "s are"} unlike the ` +
      "cells the model was trained on (marked ?): do not trust their class." }] : [];
    showTrust(el, false, [...oodNote, ...(d.warnings || [])]);
    const counts = {};
    for (const [k, v] of Object.entries(d.label_counts)) counts[k] = d.white_cells ? v / d.white_cells : 0;
    probRows($(".probs tbody", el), counts, null, "share of the cells found");
    // Boxes in percent of the image, so they follow the image whatever size it is shown at.
    const [w, h] = d.image_size;
    const boxes = $(".boxes", el);
    boxes.replaceChildren(...d.cells.map((c, i) => {
      const b = document.createElement("div");
      b.className = `cell-box${c.partial ? " partial" : c.abnormal ? " abnormal" : ""}`;
      const [x0, y0, x1, y1] = c.bbox;
      Object.assign(b.style, { left: `${(100 * x0) / w}%`, top: `${(100 * y0) / h}%`,
                               width: `${(100 * (x1 - x0)) / w}%`, height: `${(100 * (y1 - y0)) / h}%` });
      b.title = `cell ${i + 1}: ${c.label} ${pct(c.confidence)}${c.partial ? " (cut by the field edge: not counted)" : ""}`;
      const tag = document.createElement("span");
      tag.textContent = c.partial ? "partial" : `${c.label} ${pct(c.confidence)}${c.ood ? " ?" : ""}`;
      b.append(tag);
      return b;
    }));
    const details = $(".cells", el);
    details.hidden = d.cells.length === 0;
    $("thead", details).replaceChildren(row(["#", "label", "confidence", "bbox"], "th"));
    $("tbody", details).replaceChildren(...d.cells.map((c, i) =>
      row([String(i + 1), c.label, pct(c.confidence), c.bbox.join(", ")], "td")));
    $(".heatmap-switch", el).hidden = false;
    $(".switch-text", el).textContent = entry.explain ? "rendered overlay (Grad-CAM)" : "rendered overlay";
    $(".heatmap-toggle", el).checked = false;
    setView(entry, false);
    $(".meta", el).textContent = `${d.model} (${d.backend}) \u00b7 ${w}\u00d7${h} px \u00b7 audit #${d.audit_id}`;
  }

  function row(cells, tag) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement(tag);
      td.textContent = c;
      tr.append(td);
    }
    return tr;
  }

  function updateSummary() {
    const done = session.filter((e) => e.status === "done").length;
    const failed = session.filter((e) => e.status === "error").length;
    const waiting = session.length - done - failed;
    els.summary.textContent = session.length === 0 ? "No images yet." :
      `${session.length} image${session.length === 1 ? "" : "s"}: ${done} done` +
      `${failed ? `, ${failed} failed` : ""}${waiting ? `, ${waiting} waiting` : ""}.`;
    els.csv.disabled = els.html.disabled = done + failed === 0;
    els.clear.disabled = session.length === 0 || waiting > 0;
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Reports
  function classesOf(entries) {
    const out = [];
    for (const e of entries) {
      for (const k of Object.keys((e.data && (e.data.probabilities || e.data.label_counts)) || {})) {
        if (!out.includes(k)) out.push(k);
      }
    }
    return out;
  }

  function csvCell(v) {
    let s = v === null || v === undefined ? "" : String(v);
    if (/^[=+\-@\t\r]/.test(s)) s = `'${s}`;  // a spreadsheet must not run a file name as a formula
    return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
  }

  function reportRows() {
    const entries = session.filter((e) => e.status !== "pending");
    const classes = classesOf(entries);
    const header = ["file", "mode", "model", "label", "confidence", ...classes.map((c) => `p_${c}`),
                    "ood", "ood_score", "warnings", "white_cells", "abnormal_cells", "abnormal_share", "ood_cells",
                    "sha256", "audit_id", "time", "error"];
    const rows = entries.map((e) => {
      const d = e.data || {};
      const probs = classes.map((c) => (d.probabilities && c in d.probabilities ? d.probabilities[c].toFixed(6) : ""));
      const num = (x) => (typeof x === "number" ? x.toFixed(6) : "");
      const warn = (d.warnings || []).map((w) => w.code).join(";");
      return [e.file.name, e.mode || "", d.model || e.model, d.label || "", num(d.confidence), ...probs,
              d.ood === undefined || d.ood === null ? "" : String(d.ood), num(d.ood_score), warn,
              d.white_cells ?? "", d.abnormal_cells ?? "", num(d.abnormal_share), d.ood_cells ?? "", d.sha256 || "",
              d.audit_id ?? "", e.time, e.error || ""];
    });
    return { header, rows, entries };
  }

  function toCsv() {
    const { header, rows } = reportRows();
    return [header, ...rows].map((r) => r.map(csvCell).join(",")).join("\r\n") + "\r\n";
  }

  const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;",
                                                            "'": "&#39;" }[c]));

  function toHtml() {
    const { header, rows, entries } = reportRows();
    const figs = entries.map((e, i) => {
      const d = e.data;
      const img = d && (d.overlay || d.image);
      const pic = img ? `<img src="${dataUrl(img)}" alt="${esc(e.file.name)}">` : "";
      const what = !d ? `<p class="err">${esc(e.error || "")}</p>` : e.mode === "field"
        ? `<p>${d.white_cells} white cells, ${d.abnormal_cells} abnormal</p>`
        : `<p><b>${esc(d.label)}</b> ${pct(d.confidence)}</p>`;
      return `<figure>${pic}<figcaption>${i + 1}. ${esc(e.file.name)}${what}</figcaption></figure>`;
    }).join("\n");
    const table = `<table><thead><tr>${header.map((h) => `<th>${esc(h)}</th>`).join("")}</tr></thead><tbody>` +
      rows.map((r) => `<tr>${r.map((c) => `<td>${esc(c)}</td>`).join("")}</tr>`).join("\n") + "</tbody></table>";
    return `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>leukoscope report</title>
<style>body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}figure{display:inline-block;margin:8px;vertical-align:top;
max-width:320px}figure img{max-width:320px;max-height:320px}.err{color:#b00}</style></head><body>
<h1>leukoscope report</h1>
<p>${entries.length} image(s), exported ${esc(new Date().toISOString())} from ${esc(location.origin)}.
Research use and a second reader for trained staff; not a diagnosis.</p>
${table}
${figs}
</body></html>
`;
  }

  function download(text, name, type) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([text], { type }));
    a.download = name;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 5000);
  }

  const stamp = () => new Date().toISOString().slice(0, 19).replace(/[:T]/g, "-");

  // ---------------------------------------------------------------------------------------------------------------
  els.input.addEventListener("change", () => {
    addFiles([...els.input.files]);
    els.input.value = "";
  });
  els.drop.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    els.drop.classList.add("over");
  });
  els.drop.addEventListener("dragleave", () => els.drop.classList.remove("over"));
  els.drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    els.drop.classList.remove("over");
    addFiles([...ev.dataTransfer.files]);
  });
  els.drop.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      els.input.click();
    }
  });
  els.results.addEventListener("change", (ev) => {
    if (!ev.target.classList.contains("heatmap-toggle")) return;
    const el = ev.target.closest(".result");
    const entry = session.find((e) => String(e.id) === el.dataset.id);
    if (entry && entry.data) setView(entry, ev.target.checked);
  });
  els.model.addEventListener("change", showModelInfo);
  els.csv.addEventListener("click", () => download(toCsv(), `leukoscope-${stamp()}.csv`, "text/csv"));
  els.html.addEventListener("click", () => download(toHtml(), `leukoscope-${stamp()}.html`, "text/html"));
  els.clear.addEventListener("click", () => {
    session.length = 0;
    els.results.replaceChildren();
    updateSummary();
  });

  loadModels();
})();

// Renders /openapi.json as a plain page: endpoints, their parameters and form fields, answers and schemas, with a
// curl example each. Served by the app itself (FastAPI's own docs pages load their scripts from a CDN).
"use strict";

(async () => {
  const $ = (sel) => document.querySelector(sel);
  const el = (tag, text, cls) => {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  };
  let spec;
  try {
    const r = await fetch("/openapi.json");
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    spec = await r.json();
  } catch (err) {
    $("#api-description").textContent = `cannot load /openapi.json: ${err.message}`;
    return;
  }
  const schemas = (spec.components && spec.components.schemas) || {};
  const refName = (ref) => ref.split("/").pop();
  const resolve = (s) => (s && s.$ref ? schemas[refName(s.$ref)] : s) || {};

  function typeOf(s) {
    if (!s) return "";
    if (s.$ref) return refName(s.$ref);
    if (s.anyOf) return s.anyOf.map(typeOf).join(" | ");
    if (s.type === "array") return `${typeOf(s.items)}[]`;
    if (s.type === "object" && s.additionalProperties) return `{string: ${typeOf(s.additionalProperties)}}`;
    if (s.contentMediaType) return "file";
    return s.type || "any";
  }

  function fieldTable(rows) {
    const t = el("table", null, "api-table");
    const head = el("tr");
    for (const h of ["name", "in", "type", "default", "description"]) head.append(el("th", h));
    t.append(head);
    for (const r of rows) {
      const tr = el("tr");
      for (const v of r) tr.append(el("td", v));
      t.append(tr);
    }
    return t;
  }

  $("#api-version").textContent = spec.info.version ? `v${spec.info.version}` : "";
  $("#api-description").textContent = spec.info.description || "";
  const base = location.origin;
  for (const [path, ops] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(ops)) {
      const id = `${method}-${path}`.replace(/[^a-z0-9]+/gi, "-");
      const link = el("a", `${method.toUpperCase()} ${path}`);
      link.href = `#${id}`;
      $("#api-toc").append(link, el("span", ` \u2014 ${op.summary || ""}`), el("br"));
      const sec = el("section", null, "api-op");
      sec.id = id;
      sec.append(el("h2", `${method.toUpperCase()} ${path}`), el("p", op.summary || "", "api-summary"));
      if (op.description) sec.append(el("p", op.description.replace(/``/g, "")));
      const rows = [];
      for (const p of op.parameters || []) {
        rows.push([p.name, p.in, typeOf(p.schema), p.schema && p.schema.default !== undefined ?
          JSON.stringify(p.schema.default) : "", p.description || ""]);
      }
      const body = op.requestBody && op.requestBody.content;
      const form = body && body["multipart/form-data"];
      const curl = [`curl -s`];
      if (form) {
        const s = resolve(form.schema);
        for (const [name, f] of Object.entries(s.properties || {})) {
          rows.push([name, "form", typeOf(f), f.default !== undefined ? JSON.stringify(f.default) : "",
                     f.description || ""]);
        }
        curl.push("-F file=@cell.png");
      }
      if (rows.length) sec.append(fieldTable(rows));
      curl.push(`${base}${path}`);
      sec.append(el("pre", curl.join(" ")));
      const answers = el("ul");
      for (const [code, r] of Object.entries(op.responses || {})) {
        const c = r.content && r.content["application/json"];
        answers.append(el("li", `${code}: ${r.description}${c ? ` \u2192 ${typeOf(c.schema)}` : ""}`));
      }
      sec.append(el("h3", "Answers"), answers);
      $("#api-paths").append(sec);
    }
  }
  for (const [name, s] of Object.entries(schemas)) {
    if (name.startsWith("Body_") || name.includes("ValidationError")) continue;
    const sec = el("section", null, "api-op");
    sec.id = `schema-${name}`;
    sec.append(el("h3", name));
    const t = el("table", null, "api-table");
    const head = el("tr");
    for (const h of ["field", "type", "description"]) head.append(el("th", h));
    t.append(head);
    for (const [f, p] of Object.entries(s.properties || {})) {
      const tr = el("tr");
      tr.append(el("td", f), el("td", typeOf(p)), el("td", p.description || ""));
      t.append(tr);
    }
    sec.append(t);
    $("#api-schemas").append(sec);
  }
})();

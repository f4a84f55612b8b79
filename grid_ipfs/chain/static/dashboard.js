// The job page: polls /api/state once a second and redraws. Every string in the state may come from a
// peer (worker names, metric names, reasons): it only ever goes into the page as textContent, and no
// attribute but fixed class names and numbers is set from it. Charts are inline SVG drawn here.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const SOURCES = { "": ["train", "s0"], "val_": ["held-out", "s1"], "eval_": ["incoming", "s2"] };
let etag = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

function fmt(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return "-";
  if (Number.isInteger(value) && Math.abs(value) < 1e15) return String(value);
  const a = Math.abs(value);
  return a !== 0 && (a < 1e-3 || a >= 1e6) ? value.toExponential(3) : value.toFixed(4);
}

function short(text, n) {
  text = String(text ?? "");
  return text.length > n ? text.slice(0, n) + "…" : text;
}

function fillTable(table, headers, rows) {
  const head = table.tHead, body = table.tBodies[0];
  head.replaceChildren();
  body.replaceChildren();
  const tr = document.createElement("tr");
  for (const h of headers) tr.appendChild(el("th", h));
  head.appendChild(tr);
  for (const row of rows) {
    const line = document.createElement("tr");
    if (row.cls) line.className = row.cls;
    for (const cell of row.cells) {
      const td = el("td", cell.text, cell.cls);
      if (cell.title) td.title = String(cell.title);
      line.appendChild(td);
    }
    body.appendChild(line);
  }
}

function text(value, cls, title) { return { text: value, cls: cls || "text", title: title }; }
function num(value) { return { text: fmt(value) }; }

function workerName(state, id) {
  const names = (state.live && state.live.names) || {};
  return names[id] ? names[id] + " (" + short(id, 10) + ")" : short(id, 16);
}

// -- curves ----------------------------------------------------------------------------------------------

function scale(lo, hi, from, to) {
  // Map [lo, hi] to [from, to] without overflowing when the span itself is not finite (1e308 - -1e308).
  const half = hi / 2 - lo / 2;
  if (!(half > 0)) return () => (from + to) / 2;
  return (v) => from + (v / 2 - lo / 2) / half * (to - from);
}

function drawCurve(curve) {
  const W = 320, H = 190, L = 48, R = 8, T = 22, B = 34;
  const box = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "curve", role: "img" });
  const title = svg("text", { x: L, y: 14 });
  title.textContent = curve.metric;
  box.appendChild(title);
  const points = curve.series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
  if (!points.length) return box;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = scale(x0, x1, L, W - R), sy = scale(y0, y1, H - B, T);
  box.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  box.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  for (const [v, y] of [[y1, T + 4], [y0, H - B]]) {
    const label = svg("text", { x: 2, y: y });
    label.textContent = fmt(v);
    box.appendChild(label);
  }
  const xl = svg("text", { x: L, y: H - B + 14 });
  xl.textContent = "round " + fmt(x0) + " … " + fmt(x1);
  box.appendChild(xl);
  curve.series.forEach((s, i) => {
    const [name, cls] = SOURCES[s.source] || [s.source, "s3"];
    const good = s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    const coords = good.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
    if (good.length > 1) box.appendChild(svg("polyline", { points: coords, class: "line " + cls }));
    for (const p of good) box.appendChild(svg("circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5, class: cls }));
    const lx = L + 4 + i * 84, ly = H - 6;
    box.appendChild(svg("rect", { x: lx, y: ly - 8, width: 8, height: 8, class: cls }));
    const legend = svg("text", { x: lx + 11, y: ly });
    legend.textContent = short(name, 10);
    box.appendChild(legend);
  });
  return box;
}

// -- sections --------------------------------------------------------------------------------------------

function renderHeader(state) {
  document.getElementById("job").textContent = state.job;
  document.title = "grid_ipfs · " + state.job;
  const last = state.blocks[state.blocks.length - 1];
  const planned = state.rounds_planned ? " of " + state.rounds_planned : "";
  document.getElementById("summary").textContent =
    (state.source === "owner" ? "served by the job's owner" : "following the chain") + " · owner " + short(state.owner, 20) +
    " · head " + state.head + " (seq " + state.head_seq + ", round " + (last ? last.round : "?") + planned + ")";
  const v = state.verification || {};
  const badge = document.getElementById("verification");
  badge.textContent = v.state === "ok" ? "verified" : v.state;
  badge.className = "badge " + (["ok", "failed", "error", "running", "pending"].includes(v.state) ? v.state : "pending");
  const detail = v.state === "ok" ? v.blocks + " blocks verified from seq " + v.seq + " to genesis" +
    (v.seq < state.head_seq ? " (newer blocks pending)" : "") + (v.unproven ? "; " + v.unproven + " unproven" : "")
    : v.state === "running" ? "checking up to seq " + v.running_seq + "…" : (v.reason || "");
  document.getElementById("verification-detail").textContent = detail;
  const dropped = Object.entries((state.follow && state.follow.dropped) || {}).map(([k, n]) => k + " ×" + n).join(", ");
  document.getElementById("status").textContent = [state.status, dropped ? "dropped messages: " + dropped : ""]
    .filter(Boolean).join(" · ");
}

function renderRows(state) {
  const unit = state.mode === "async" ? "block" : "round";
  document.getElementById("rows-title").textContent = state.mode === "async" ? "Blocks (async)" : "Rounds";
  document.getElementById("omitted").textContent = state.omitted ? state.omitted + " older blocks not listed" : "";
  const keys = ["loss", "accuracy", "val_loss", "val_accuracy"];
  const rows = state.blocks.slice().reverse().map((b) => ({
    cls: b.accepted ? "" : "rejected",
    cells: [num(b.seq), num(b.round), text(b.accepted ? "accepted" : "rejected try", "text"), num(b.workers), num(b.examples),
      ...keys.map((k) => num(b.metrics[k])), num(b.metrics.rejected_updates),
      text(b.verify, "text badge " + b.verify, b.verify_reason || b.verify), text(short(b.cid, 20), "text", b.cid)],
  }));
  fillTable(document.getElementById("rows"), ["seq", unit, "", "workers", "examples", ...keys, "refused", "verified", "block"], rows);
}

function renderWorkers(state) {
  const rows = state.workers.map((w) => ({
    cells: [text(workerName(state, w.worker), "text", w.worker), num(w.blocks), num(w.examples), num(w.last_round),
      num(w.last_metrics.loss), num(w.last_metrics.accuracy)],
  }));
  fillTable(document.getElementById("workers"), ["worker", "blocks", "examples", "last round", "loss", "accuracy"], rows);
}

function renderContributions(state) {
  const rows = [];
  for (const b of state.blocks.slice(-8).reverse()) {
    for (const u of b.updates) {
      const others = Object.entries(u.metrics).filter(([k]) => k !== "loss" && k !== "accuracy")
        .map(([k, v]) => k + "=" + fmt(v)).join(" ");
      rows.push({ cls: b.accepted ? "" : "rejected", cells: [num(b.round), num(b.seq), text(workerName(state, u.worker), "text", u.worker),
        num(u.examples), num(u.metrics.loss), num(u.metrics.accuracy), text(short(others, 80), "text", others)] });
    }
    if (b.more_updates) rows.push({ cells: [num(b.round), num(b.seq), text("… " + b.more_updates + " more"), text(""), text(""), text(""), text("")] });
  }
  fillTable(document.getElementById("contributions"), ["round", "seq", "worker", "examples", "loss", "accuracy", "other metrics"], rows);
}

function renderRejected(state) {
  const list = document.getElementById("rejected");
  list.replaceChildren();
  for (const b of state.blocks) {
    if (!b.accepted) list.appendChild(el("li", "round " + b.round + " (seq " + b.seq + "): aggregate rejected by the acceptance rule"));
    if (b.metrics.rejected_updates > 0) list.appendChild(el("li", "round " + b.round + " (seq " + b.seq + "): " + b.metrics.rejected_updates + " update(s) refused"));
  }
  const live = state.live || {};
  for (const r of live.refused || []) list.appendChild(el("li", "round " + r.round + ": refused " + r.count + " × " + r.reason));
  for (const r of live.rejected_tries || []) list.appendChild(el("li", "round " + r.round + " try " + r.try + " rejected: " + r.why));
  if (!list.children.length) list.appendChild(el("li", "nothing rejected", "muted"));
}

function renderLive(state) {
  const live = state.live;
  document.getElementById("live-section").hidden = !live;
  document.getElementById("events-section").hidden = !live;
  if (!live) return;
  const c = live.current;
  document.getElementById("current").textContent = live.state + (c ? " · round " + c.round + ": " + c.received + "/" + c.expected + " updates" : "") +
    " · " + live.joined + " worker(s) joined";
  const list = document.getElementById("events");
  list.replaceChildren();
  for (const e of live.events.slice().reverse()) {
    list.appendChild(el("li", new Date(e.time * 1000).toLocaleTimeString() + "  " + e.text));
  }
}

function render(state) {
  renderHeader(state);
  renderLive(state);
  const curves = document.getElementById("curves");
  curves.replaceChildren(...state.curves.map(drawCurve));
  renderRows(state);
  renderWorkers(state);
  renderContributions(state);
  renderRejected(state);
  document.getElementById("updated").textContent = "state version " + state.version + " at " + new Date().toLocaleTimeString();
  document.body.dataset.version = String(state.version);
}

async function poll() {
  try {
    const headers = etag ? { "If-None-Match": etag } : {};
    const response = await fetch("/api/state", { headers: headers, cache: "no-store" });
    if (response.status === 200) {
      etag = response.headers.get("ETag");
      render(await response.json());
    }
  } catch (err) {
    document.getElementById("updated").textContent = "cannot reach the server: " + err;
  } finally {
    setTimeout(poll, 1000);
  }
}

poll();

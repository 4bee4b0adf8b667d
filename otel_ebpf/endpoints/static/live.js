// otel-ebpf live page: polls /api/live (2 s) and /api/profile (10 s) on this server.
// Every value from the agent goes into the page as text (textContent), never as markup.
"use strict";

const LIVE_MS = 2000, PROFILE_MS = 10000, COLUMNS = 150, ROW_PX = 18;
const $ = (id) => document.getElementById(id);
const history = new Map();   // series key -> {last: cumulative buckets, columns: [...]}
let lastLive = null, chosen = null, flameRoot = null, flameZoom = [];

function seconds(v) {
  if (!isFinite(v)) return "-";
  const units = [[1, "s"], [1e-3, "ms"], [1e-6, "us"], [1e-9, "ns"]];
  for (const [f, u] of units) if (v >= f) return (v / f).toPrecision(3) + " " + u;
  return (v / 1e-9).toPrecision(3) + " ns";
}
const bound = (index, scale) => Math.pow(2, (index + 1) / Math.pow(2, scale));
const keyOf = (s) => s.workload + " | " + s.syscall;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

// ---- syscall latency heatmap: one column per poll, the calls of that interval -------
function absorb(series) {
  for (const s of series) {
    const key = keyOf(s);
    const counts = new Map(s.counts.map((c, i) => [s.offset + i, c]));
    let h = history.get(key);
    if (!h) { h = {last: new Map(), columns: [], scale: s.scale}; history.set(key, h); }
    const delta = new Map();
    for (const [i, c] of counts) if (c - (h.last.get(i) || 0) > 0) delta.set(i, c - (h.last.get(i) || 0));
    h.last = counts; h.series = s;
    h.columns.push(delta);
    if (h.columns.length > COLUMNS) h.columns.shift();
  }
}

function percentile(s, q) {
  const total = s.counts.reduce((a, b) => a + b, 0);
  let seen = 0;
  for (let i = 0; i < s.counts.length; i++) {
    seen += s.counts[i];
    if (seen >= q * total && s.counts[i]) return bound(s.offset + i, s.scale);
  }
  return NaN;
}

function drawHeatmap() {
  const canvas = $("heatmap"), ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const h = chosen && history.get(chosen);
  if (!h) { $("heatmap-caption").textContent = "no syscall measured yet"; return; }
  let lo = Infinity, hi = -Infinity, max = 0;
  for (const col of h.columns) for (const [i, c] of col) {
    lo = Math.min(lo, i); hi = Math.max(hi, i); max = Math.max(max, c);
  }
  const s = h.series, left = 70, rows = hi - lo + 1;
  if (rows > 0 && max > 0) {
    const cw = (canvas.width - left) / COLUMNS, rh = canvas.height / rows;
    h.columns.forEach((col, x) => {
      for (const [i, c] of col) {
        const a = Math.log1p(c) / Math.log1p(max);
        ctx.fillStyle = `rgba(214, 76, 20, ${0.15 + 0.85 * a})`;
        ctx.fillRect(left + (COLUMNS - h.columns.length + x) * cw, canvas.height - (i - lo + 1) * rh, cw, rh);
      }
    });
    ctx.fillStyle = "#334"; ctx.font = "11px sans-serif";
    const step = Math.max(1, Math.ceil(rows / 10));
    for (let i = lo; i <= hi; i += step) {
      ctx.fillText("≤ " + seconds(bound(i, h.scale)), 2, canvas.height - (i - lo) * rh - 2);
    }
  }
  $("heatmap-caption").textContent =
    `${s.workload}: ${s.syscall} - ${s.count} calls, p50 ≤ ${seconds(percentile(s, 0.5))}, ` +
    `p99 ≤ ${seconds(percentile(s, 0.99))} (bucket upper bounds; columns every ${LIVE_MS / 1000} s)`;
}

function updateSeries(series) {
  const select = $("series"), keys = series.map(keyOf);
  if (!chosen || !keys.includes(chosen)) chosen = keys[0] || null;
  select.replaceChildren(...keys.map((k) => {
    const o = el("option", k); o.value = k; o.selected = k === chosen; return o;
  }));
}

// ---- retransmits, health ----------------------------------------------------------
function updateRetransmits(live) {
  const before = new Map((lastLive ? lastLive.retransmits : []).map((r) => [r.peer + r.workload, r.segments]));
  const dt = lastLive ? live.time - lastLive.time : 0;
  const body = $("retransmits").tBodies[0];
  body.replaceChildren(...live.retransmits.map((r) => {
    const tr = el("tr"), prev = before.get(r.peer + r.workload);
    const rate = dt > 0 && prev !== undefined ? ((r.segments - prev) / dt).toFixed(1) : "-";
    for (const v of [r.peer, r.workload, String(r.segments), rate]) tr.append(el("td", v));
    return tr;
  }));
  if (!live.retransmits.length) {
    const tr = el("tr"); tr.append(el("td", "no retransmits")); body.append(tr);
  }
}

function updateHealth(live) {
  const ready = live.ready, health = live.health, rows = [];
  rows.push(["ready", ready.ready ? "yes" : "no"]);
  for (const [p, s] of Object.entries(ready.probes)) rows.push(["probe " + p, s]);
  rows.push(["metrics export", ready.metrics_export]);
  if (health.rss_bytes !== undefined) rows.push(["memory (RSS)", (health.rss_bytes / 1048576).toFixed(1) + " MiB"]);
  if (health.cpu_seconds !== undefined) rows.push(["CPU time", health.cpu_seconds.toFixed(1) + " s"]);
  for (const [m, v] of Object.entries(health.map_fill)) rows.push(["map fill " + m, (100 * v).toFixed(1) + " %"]);
  const lost = Object.entries(health.lost_events);
  if (!lost.length) rows.push(["lost events", "none"]);
  for (const [r, n] of lost) rows.push(["lost " + r, String(n)]);
  $("health").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  const status = $("status");
  status.textContent = ready.ready ? "ready" : "not ready";
  status.className = ready.ready ? "ready" : "unready";
}

// ---- flame graph (root on top) ------------------------------------------------------
function drawFlame() {
  const box = $("flame");
  const root = flameZoom.length ? flameZoom[flameZoom.length - 1] : flameRoot;
  if (!root || !root.value) { box.replaceChildren(el("p", "no CPU samples yet", "detail")); return; }
  const nodes = [];
  let depth = 0;
  (function walk(node, x, d) {
    const width = node.value / root.value;
    if (width < 0.002) return;
    depth = Math.max(depth, d);
    const div = el("div", node.name,
      d === 0 ? "r" : node.name.endsWith("_[k]") ? "k" : d === 1 ? "p" : "u");
    div.style.left = (100 * x) + "%"; div.style.width = (100 * width) + "%";
    div.style.top = (d * ROW_PX) + "px";
    div.title = `${node.name}: ${node.value} samples (${(100 * node.value / flameRoot.value).toFixed(1)} %)`;
    div.addEventListener("click", () => {
      if (d === 0) flameZoom.pop(); else flameZoom.push(node);
      drawFlame();
    });
    nodes.push(div);
    let cx = x;
    for (const c of node.children) { walk(c, cx, d + 1); cx += c.value / root.value; }
  })(root, 0, 0);
  box.style.height = ((depth + 1) * ROW_PX) + "px";
  box.replaceChildren(...nodes);
}

// ---- polling --------------------------------------------------------------------------
async function getJSON(path) {
  const r = await fetch(path, {cache: "no-store"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

async function pollLive() {
  try {
    const live = await getJSON("api/live");
    absorb(live.syscalls); updateSeries(live.syscalls); drawHeatmap();
    updateRetransmits(live); updateHealth(live);
    lastLive = live;
  } catch (e) {
    $("status").textContent = "agent unreachable"; $("status").className = "unready";
  }
  setTimeout(pollLive, LIVE_MS);
}

async function pollProfile() {
  try {
    const p = await getJSON("api/profile");
    flameRoot = p.root; flameZoom = [];
    $("flame-window").textContent = `last ${Math.round(p.window_seconds / 60)} min, ${p.root.value} samples`;
    drawFlame();
  } catch (e) { /* the status line says it */ }
  setTimeout(pollProfile, PROFILE_MS);
}

$("series").addEventListener("change", (e) => { chosen = e.target.value; drawHeatmap(); });
pollLive();
pollProfile();

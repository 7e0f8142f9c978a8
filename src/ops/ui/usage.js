// tokenrelay's usage page: charts of tokens over the last 24 hours and 30 days, grouped by
// client, model or credential, drawn as inline SVG by this script (no library, no CDN;
// the CSP stays strict). Reads only GET /admin/usage. Renders through textContent and
// SVG attributes only: names come from configuration and requests.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 15000;
const COLORS = 8;           // c0..c7 in app.css; the 8th is "other"
const RANGES = {
  day: { since: "24h", step: 3600, stepText: "1h" },
  month: { since: "30d", step: 86400, stepText: "1d" },
};
let timer = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function token() { return sessionStorage.getItem("tokenrelay-admin-token") || ""; }

async function api(path) {
  const headers = { "Accept": "application/json" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  const resp = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
  if (resp.status === 401) { $("token-box").hidden = false; throw new Error("the admin API wants server.admin_token: type it above"); }
  const json = await resp.json();
  if (resp.status !== 200) throw new Error((json.error && json.error.message) || `HTTP ${resp.status}`);
  return json;
}

function say(text) { const m = $("message"); m.textContent = text || ""; m.hidden = !text; }

function compact(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(n >= 1e10 ? 0 : 1) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(n >= 1e4 ? 0 : 1) + "k";
  return String(n);
}

// A round axis maximum at or above `max`.
function niceMax(max) {
  if (max <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= max) return m * p;
  return 10 * p;
}

// The groups of both ranges, largest first; all beyond the 7th share "other".
function palette(rows, by) {
  const totals = new Map();
  for (const r of rows) totals.set(r[by], (totals.get(r[by]) || 0) + r.tokens);
  const names = [...totals.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).map((e) => e[0]);
  const color = new Map();
  names.forEach((n, i) => color.set(n, i < COLORS - 1 ? i : COLORS - 1));
  return { names, color, other: names.length > COLORS - 1 };
}

function label(ms, step) {
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, "0");
  return step < 86400 ? `${pad(d.getUTCHours())}:00` : `${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())}`;
}

function chart(box, answer, by, pal) {
  const step = answer.step_seconds * 1000;
  const since = Math.floor(Date.parse(answer.since) / step) * step;
  const until = Date.parse(answer.until);
  const buckets = [];
  for (let t = since; t < until; t += step) buckets.push(t);
  // bucket start -> color index -> tokens
  const stacks = new Map(buckets.map((t) => [t, new Map()]));
  let total = 0;
  for (const r of answer.rows) {
    const s = stacks.get(Date.parse(r.start));
    if (!s) continue;
    const c = pal.color.get(r[by]);
    s.set(c, (s.get(c) || 0) + r.tokens);
    total += r.tokens;
  }
  let max = 0;
  for (const s of stacks.values()) max = Math.max(max, [...s.values()].reduce((a, b) => a + b, 0));
  const top = niceMax(max);
  const W = 960, H = 240, L = 56, R = 8, T = 10, B = 26;
  const plotW = W - L - R, plotH = H - T - B;
  const bw = plotW / buckets.length;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "bars", "data-total": total, "data-buckets": buckets.length });
  root.append(svg("title"));
  root.firstChild.textContent = `${compact(total)} tokens in ${buckets.length} buckets`;
  for (let i = 0; i <= 4; i++) {
    const y = T + plotH - (plotH * i) / 4;
    root.append(svg("line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid" }));
    const t = svg("text", { x: L - 6, y: y + 4, class: "axis", "text-anchor": "end" });
    t.textContent = compact((top * i) / 4);
    root.append(t);
  }
  const every = Math.ceil(buckets.length / 12);
  buckets.forEach((t, i) => {
    const x = L + i * bw;
    let y = T + plotH;
    const s = stacks.get(t);
    for (const [c, n] of [...s.entries()].sort((a, b) => a[0] - b[0])) {
      const h = (plotH * n) / top;
      y -= h;
      const rect = svg("rect", { x: x + 1, y, width: Math.max(bw - 2, 1), height: h, class: "c" + c, "data-tokens": n, "data-color": c });
      const tip = svg("title");
      const name = c === COLORS - 1 && pal.other ? "other" : pal.names[c];
      tip.textContent = `${name} · ${new Date(t).toISOString().slice(0, 16).replace("T", " ")} UTC · ${n} tokens`;
      rect.append(tip);
      root.append(rect);
    }
    if (i % every === 0) {
      const lab = svg("text", { x: x + bw / 2, y: H - 8, class: "axis", "text-anchor": "middle" });
      lab.textContent = label(t, answer.step_seconds);
      root.append(lab);
    }
  });
  if (total === 0) {
    const t = svg("text", { x: L + plotW / 2, y: T + plotH / 2, class: "axis", "text-anchor": "middle" });
    t.textContent = "no usage in this range";
    root.append(t);
  }
  box.replaceChildren(root);
}

function legend(pal) {
  const ul = $("legend"); ul.replaceChildren();
  pal.names.slice(0, COLORS - 1).forEach((n, i) => {
    const li = el("li"); li.append(el("span", "", "swatch c" + i), " ", el("span", n === "-" ? "- (no named client)" : n));
    ul.append(li);
  });
  if (pal.other) { const li = el("li"); li.append(el("span", "", "swatch c" + (COLORS - 1)), " ", el("span", "other")); ul.append(li); }
}

function totalsTable(rows, by) {
  const body = $("total-rows"); body.replaceChildren();
  const sorted = [...rows].sort((a, b) => b.tokens - a.tokens);
  for (const r of sorted) {
    const tr = el("tr"); tr.dataset.group = r[by];
    tr.append(el("td", r[by]));
    for (const k of ["answers", "prompt", "completion", "cached", "thoughts", "tokens", "unknown"]) {
      const td = el("td", r[k].toLocaleString("en-US"), "num"); td.dataset.kind = k; tr.append(td);
    }
    body.append(tr);
  }
  if (!sorted.length) { const tr = el("tr"); const td = el("td", "No usage yet."); td.colSpan = 8; tr.append(td); body.append(tr); }
}

function windowCell(spent, limit) {
  const td = el("td", null, "num");
  td.append(el("span", limit ? `${spent.toLocaleString("en-US")} / ${limit.toLocaleString("en-US")}` : spent.toLocaleString("en-US")));
  if (limit) {
    const m = el("meter"); m.min = 0; m.max = limit; m.value = Math.min(spent, limit); m.high = limit * 0.8; m.optimum = 0;
    td.append(" ", m);
  }
  return td;
}

function clientsTable(clients) {
  const body = $("client-rows"); body.replaceChildren();
  for (const c of clients) {
    const tr = el("tr"); tr.dataset.client = c.name;
    tr.append(el("td", c.name, "id"));
    tr.append(windowCell(c.spent.requests_in_minute, c.limits.rpm));
    tr.append(windowCell(c.spent.tokens_in_minute, c.limits.tpm));
    tr.append(windowCell(c.spent.tokens_today, c.limits.tokens_per_day));
    tr.append(windowCell(c.spent.tokens_this_month, c.limits.tokens_per_month));
    body.append(tr);
  }
  if (!clients.length) { const tr = el("tr"); const td = el("td", "No [[clients]] configured."); td.colSpan = 5; tr.append(td); body.append(tr); }
}

async function load() {
  const by = $("by").value;
  try {
    const q = (r) => `/admin/usage?by=${by}&since=${RANGES[r].since}&step=${RANGES[r].stepText}`;
    const [day, month, totals] = await Promise.all([api(q("day")), api(q("month")), api(`/admin/usage?by=${by}&since=30d`)]);
    const pal = palette(month.rows.concat(day.rows), by);
    chart($("chart-day"), day, by, pal);
    chart($("chart-month"), month, by, pal);
    legend(pal);
    $("by-name").textContent = by;
    $("group-head").textContent = by[0].toUpperCase() + by.slice(1);
    totalsTable(totals.rows, by);
    clientsTable(totals.clients);
    $("store").textContent = `Kept in ${totals.store}; ${compact(totals.total.tokens)} tokens in 30 days.`;
    $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
    document.body.dataset.loaded = by;
    say("");
  } catch (e) { say(String(e.message || e)); }
}

function schedule() {
  clearInterval(timer);
  if (document.hidden) return;
  timer = setInterval(load, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("by").addEventListener("input", load);
  $("token-save").addEventListener("click", () => { sessionStorage.setItem("tokenrelay-admin-token", $("token").value); $("token").value = ""; $("token-box").hidden = true; load(); });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) load(); schedule(); });
  load(); schedule();
});

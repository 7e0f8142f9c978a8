// tokenrelay's operator console. Reads only the JSON API (/admin/credentials, /readyz)
// and drives it (refresh, reload, login). Renders through textContent only: error text
// comes from upstream bodies. The admin token stays in sessionStorage and goes as a bearer
// header; every POST carries X-Tokenrelay: 1 (browser-safety rule of the admin API).
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 3000;
let data = null;          // last /admin/credentials answer
let skewMs = 0;           // server clock minus this browser's clock
let timer = null;
let login = null;         // { session, provider, id }

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function token() { return sessionStorage.getItem("tokenrelay-admin-token") || ""; }

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (method !== "GET") { headers["X-Tokenrelay"] = "1"; }
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store", credentials: "omit" });
  if (resp.status === 401) { $("token-box").hidden = false; throw new Error("the admin API wants server.admin_token: type it above"); }
  let json = null;
  try { json = await resp.json(); } catch (_) { /* not JSON */ }
  return { status: resp.status, json };
}

function say(text) {
  const m = $("message");
  m.textContent = text || "";
  m.hidden = !text;
}

function human(secs) {
  if (secs === null || secs === undefined) return "–";
  const neg = secs < 0; let s = Math.abs(Math.round(secs));
  const d = Math.floor(s / 86400); s -= d * 86400;
  const h = Math.floor(s / 3600); s -= h * 3600;
  const m = Math.floor(s / 60); s -= m * 60;
  const out = d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
  return neg ? `expired ${out} ago` : out;
}

function serverNow() { return Date.now() + skewMs; }

function ago(iso) {
  if (!iso) return "never";
  return human((serverNow() - Date.parse(iso)) / 1000) + " ago";
}

function fillSelect(select, values) {
  const keep = select.value;
  while (select.options.length > 1) select.remove(1);
  for (const v of values) select.add(new Option(v, v));
  select.value = values.includes(keep) ? keep : "";
}

function visible(c) {
  const st = $("f-state").value, pr = $("f-provider").value, q = $("f-text").value.trim().toLowerCase();
  if (st && c.state !== st) return false;
  if (pr && c.provider !== pr) return false;
  if (q && ![c.id, c.provider, c.account, c.last_error, c.kind].some((v) => (v || "").toLowerCase().includes(q))) return false;
  return true;
}

function render() {
  if (!data) return;
  const creds = data.credentials;
  const counts = {};
  for (const c of creds) counts[c.state] = (counts[c.state] || 0) + 1;
  const ul = $("counts"); ul.replaceChildren();
  for (const [state, n] of Object.entries(counts).sort()) {
    const li = el("li"); li.append(el("span", state, "badge " + state), " ", el("span", n));
    ul.append(li);
  }
  fillSelect($("f-state"), [...new Set(creds.map((c) => c.state))].sort());
  fillSelect($("f-provider"), [...new Set(creds.map((c) => c.provider))].sort());
  const rows = $("rows"); rows.replaceChildren();
  for (const c of creds.filter(visible)) rows.append(row(c));
  tick();
}

function cell(label, ...children) {
  const td = el("td"); td.dataset.label = label; td.append(...children); return td;
}

function row(c) {
  const tr = el("tr"); tr.dataset.provider = c.provider; tr.dataset.id = c.id; tr.dataset.state = c.state;
  const name = el("div"); name.append(el("div", `${c.provider}/${c.id}`, "id"), el("div", c.path || "", "sub"));
  tr.append(cell("Credential", name));
  tr.append(cell("Account", el("span", c.account || "–")));
  tr.append(cell("Kind", el("span", c.kind)));
  const state = el("span", c.state, "badge " + c.state); state.setAttribute("data-role", "state");
  tr.append(cell("State", state, el("div", c.usable ? "usable" : "not usable", "sub")));
  const exp = el("span", "–"); exp.setAttribute("data-role", "expires");
  if (c.expires_at) exp.dataset.expiresAt = c.expires_at;
  const expCell = cell("Expires in", exp); expCell.className = "num"; tr.append(expCell);
  const last = el("span", ago(c.last_refresh_at)); last.dataset.role = "last-refresh";
  tr.append(cell("Last refresh", last));
  const fails = cell("Failures", el("span", c.consecutive_failures)); fails.className = "num"; tr.append(fails);
  const coolCell = el("div"); coolCell.dataset.role = "cooldowns";
  for (const m of c.cooldowns || []) {
    const left = m.seconds > 0 ? human(m.seconds) : "probing";
    const line = el("div", `${m.model || "all models"} ${left}`);
    line.append(el("span", ` ${m.reason.replace("_", " ")}${m.scope === "project" ? " · project" + (c.project ? " " + c.project : "") : ""}`, "sub"));
    line.title = "until " + m.until; line.dataset.reason = m.reason; line.dataset.scope = m.scope;
    coolCell.append(line);
  }
  if (!coolCell.childNodes.length) coolCell.append(el("span", "–"));
  tr.append(cell("Cool-downs", coolCell));
  const err = el("div");
  if (c.last_error) {
    const d = el("details"); d.append(el("summary", c.last_error.length > 60 ? c.last_error.slice(0, 60) + "…" : c.last_error), el("p", c.last_error));
    err.append(d);
  }
  if (!c.usable && c.hint) { const h = el("p", "To fix: " + c.hint, "hint"); h.dataset.role = "hint"; err.append(h); }
  if (!c.last_error && c.usable) err.append(el("span", "–"));
  tr.append(cell("Last error / what to do", err));
  const act = el("div", null, "row-actions");
  const refresh = el("button", "Refresh"); refresh.type = "button"; refresh.dataset.action = "refresh";
  refresh.addEventListener("click", () => refreshOne(c, refresh));
  act.append(refresh);
  if (c.login) {
    const re = el("button", "Re-authenticate"); re.type = "button"; re.dataset.action = "login";
    re.addEventListener("click", () => startLogin(c, re));
    act.append(re);
  }
  tr.append(cell("Actions", act));
  return tr;
}

function tick() {
  for (const e of document.querySelectorAll("[data-role=expires]")) {
    if (!e.dataset.expiresAt) continue;
    e.textContent = human((Date.parse(e.dataset.expiresAt) - serverNow()) / 1000);
  }
}

async function load() {
  try {
    const [creds, ready] = await Promise.all([api("GET", "/admin/credentials"), fetch("/readyz", { cache: "no-store" }).then((r) => r.json().then((j) => ({ status: r.status, json: j })))]);
    if (creds.status !== 200) throw new Error((creds.json && creds.json.error && creds.json.error.message) || `HTTP ${creds.status}`);
    data = creds.json;
    skewMs = (data.server_time_ms || Date.now()) - Date.now();
    const v = $("verdict");
    if (ready.status === 200) { v.textContent = "Ready: every provider with credentials has a usable one."; v.className = "verdict ok"; }
    else {
      const bad = (ready.json.providers || []).filter((p) => !p.ready).map((p) => `${p.provider}: ${p.message}`);
      v.textContent = "Not ready — " + (bad.join("; ") || "no provider has credentials"); v.className = "verdict bad";
    }
    $("updated").textContent = "Updated " + new Date(serverNow()).toLocaleTimeString() + " (server time)";
    say("");
    render();
  } catch (e) { say(String(e.message || e)); }
}

function schedule() {
  clearInterval(timer);
  if (document.hidden) return;   // paused while the tab is hidden
  timer = setInterval(load, POLL_MS);
}

async function refreshOne(c, button) {
  button.disabled = true;
  try {
    const r = await api("POST", `/admin/credentials/${encodeURIComponent(c.provider)}/${encodeURIComponent(c.id)}/refresh`);
    if (r.json && r.json.error && typeof r.json.error === "string") say(`${c.provider}/${c.id}: ${r.json.error}`);
    else if (r.json && r.json.error && r.json.error.message) say(r.json.error.message);
  } catch (e) { say(String(e.message || e)); }
  button.disabled = false;
  await load();
}

async function post(path, button) {
  button.disabled = true;
  try {
    const r = await api("POST", path);
    if (r.status >= 400 && r.json && r.json.error) say(typeof r.json.error === "string" ? r.json.error : r.json.error.message);
  } catch (e) { say(String(e.message || e)); }
  button.disabled = false;
  await load();
}

async function startLogin(c, button) {
  button.disabled = true;
  try {
    const r = await api("POST", `/admin/credentials/${encodeURIComponent(c.provider)}/${encodeURIComponent(c.id)}/login`);
    if (r.status !== 200) { say((r.json && r.json.error && r.json.error.message) || `HTTP ${r.status}`); return; }
    login = { session: r.json.session, provider: c.provider, id: c.id };
    $("login").hidden = false;
    $("login-title").textContent = `Re-authenticate ${c.provider}/${c.id}`;
    const link = $("login-link");
    if (r.json.kind === "loopback") {
      $("login-text").textContent = "Sign in on Google's page (opened in a new tab). Google sends you back here and the row turns ready by itself.";
      link.href = r.json.authorization_url; link.textContent = "Open Google's sign-in page";
      $("login-code").textContent = ""; $("login-paste").hidden = false;
      window.open(r.json.authorization_url, "_blank", "noopener,noreferrer");
    } else {
      $("login-text").textContent = "Open the link and enter the code; this page waits.";
      const u = r.json.verification_uri_complete || r.json.verification_uri;
      link.href = u; link.textContent = u;
      $("login-code").textContent = r.json.user_code; $("login-paste").hidden = true;
    }
    waitLogin();
  } catch (e) { say(String(e.message || e)); }
  finally { button.disabled = false; }
}

async function waitLogin() {
  if (!login) return;
  try {
    const r = await api("GET", `/admin/login/${encodeURIComponent(login.session)}`);
    if (r.json && r.json.status === "done") { $("login-text").textContent = "Signed in. " + r.json.message; $("login-paste").hidden = true; login = null; await load(); return; }
    if (r.json && r.json.status === "error") { $("login-text").textContent = "Sign-in failed: " + r.json.message; login = null; return; }
  } catch (e) { say(String(e.message || e)); }
  setTimeout(waitLogin, 1500);
}

async function submitPasted() {
  if (!login) return;
  const r = await api("POST", `/admin/login/${encodeURIComponent(login.session)}/callback`, { url: $("login-url").value });
  if (r.status !== 200) say((r.json && r.json.error && r.json.error.message) || `HTTP ${r.status}`);
  await waitLogin();
}

document.addEventListener("DOMContentLoaded", () => {
  $("refresh-all").addEventListener("click", (e) => post("/admin/refresh", e.currentTarget));
  $("reload").addEventListener("click", (e) => post("/admin/reload", e.currentTarget));
  $("token-save").addEventListener("click", () => { sessionStorage.setItem("tokenrelay-admin-token", $("token").value); $("token").value = ""; $("token-box").hidden = true; load(); });
  $("login-submit").addEventListener("click", submitPasted);
  $("login-close").addEventListener("click", () => { $("login").hidden = true; login = null; });
  for (const id of ["f-state", "f-provider", "f-text"]) $(id).addEventListener("input", render);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) load(); schedule(); });
  setInterval(tick, 1000);
  load(); schedule();
});

// The Tinker console: hash-routed pages over /console/api/ (see tinker_backend/console.py).
// The API key lives only in sessionStorage and goes out as X-API-Key. No dependencies.
"use strict";

const KEY = "tinker-console-key";
const POLL_MS = 2000; // how often the run page and the lists refresh
let me = null; // {owner, admin} of the signed-in key
let timer = null;
let drawn = {}; // what each part of the page last drew, to redraw only on change (keeps the focus)
const sorting = { runs: { column: "last_activity", descending: true } };

const $ = (selector) => document.querySelector(selector);

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const headers = { "X-API-Key": sessionStorage.getItem(KEY) || "", ...(options.headers || {}) };
  const reply = await fetch("/console/api/" + path, { ...options, headers });
  if (!reply.ok) {
    let message = reply.statusText;
    try { message = (await reply.json()).error || message; } catch (_) { /* not JSON */ }
    throw new ApiError(reply.status, message);
  }
  return options.raw ? reply : reply.json();
}

function post(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

// --- formatting ---

function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

function ttl(iso) {
  if (!iso) return "never";
  const s = (Date.parse(iso) - Date.now()) / 1000;
  if (s <= 0) return "expired";
  return s < 3600 ? `in ${Math.round(s / 60)} min` : `in ${(s / 3600).toFixed(1)} h`;
}

const num = (v, digits = 4) => (v === null || v === undefined ? "–" : Number(v).toPrecision(digits));

// --- sign-in ---

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  try {
    me = await api("me");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    me = null;
    throw e;
  }
}

function showSignIn(message = "") {
  stopPolling();
  $("#nav").hidden = true;
  $("#view").innerHTML = "";
  $("#signin").hidden = false;
  $("#signin-error").textContent = message;
  $("#api-key").focus();
}

function showNav() {
  $("#signin").hidden = true;
  $("#nav").hidden = false;
  $("#nav-server").hidden = !me.admin;
  $("#whoami").textContent = `signed in as ${me.owner}${me.admin ? " (admin)" : ""}`;
}

// --- pages ---

function stopPolling() {
  if (timer !== null) clearInterval(timer);
  timer = null;
}

function fresh(part, data) {
  const text = JSON.stringify(data);
  if (drawn[part] === text) return false;
  drawn[part] = text;
  return true;
}

function poll(render) {
  stopPolling();
  drawn = {};
  timer = setInterval(() => render().catch(failed), POLL_MS);
  return render();
}

function failed(e) {
  if (e instanceof ApiError && e.status === 401) {
    sessionStorage.removeItem(KEY);
    showSignIn("Your key was refused: " + e.message);
    return;
  }
  $("#view").innerHTML = `<p class="error" role="alert">${esc(e.message)}</p>`;
}

function sortRows(rows, { column, descending }) {
  const sign = descending ? -1 : 1;
  return [...rows].sort((a, b) => {
    const x = a[column] ?? "", y = b[column] ?? "";
    return (x < y ? -1 : x > y ? 1 : 0) * sign;
  });
}

const RUN_COLUMNS = [
  ["run_id", "Run"], ["base_model", "Base model"], ["rank", "Rank", "num"], ["owner", "Owner"],
  ["steps", "Steps", "num"], ["tokens", "Tokens", "num"], ["last_loss", "Last loss", "num"],
  ["state", "State"], ["last_activity", "Last activity"],
];

async function runsPage() {
  $("#view").innerHTML = `
    <h1>Training runs</h1>
    <div class="toolbar">
      <label for="run-filter">Filter</label>
      <input id="run-filter" type="search" placeholder="run id, base model or state" value="${esc(sessionStorage.getItem("run-filter") || "")}">
      <span id="run-count" class="muted"></span>
    </div>
    <table id="runs"><thead><tr>${RUN_COLUMNS.map(([key, label, cls]) =>
      `<th class="${cls || ""}" aria-sort="none"><button type="button" data-sort="${key}">${label}</button></th>`).join("")}</tr></thead>
    <tbody></tbody></table>`;
  let runs = [];
  const draw = () => {
    const filter = $("#run-filter").value.trim().toLowerCase();
    sessionStorage.setItem("run-filter", filter);
    const shown = sortRows(runs, sorting.runs).filter((r) =>
      !filter || [r.run_id, r.base_model, r.state].some((v) => String(v).toLowerCase().includes(filter)));
    $("#run-count").textContent = `${shown.length} of ${runs.length}`;
    for (const th of document.querySelectorAll("#runs th")) {
      const key = th.querySelector("button").dataset.sort;
      th.setAttribute("aria-sort", key === sorting.runs.column ? (sorting.runs.descending ? "descending" : "ascending") : "none");
    }
    $("#runs tbody").innerHTML = shown.map((r) => `
      <tr data-run="${esc(r.run_id)}">
        <td><a href="#/run/${encodeURIComponent(r.run_id)}">${esc(r.run_id)}</a></td>
        <td>${esc(r.base_model)}</td><td class="num">${esc(r.rank)}</td><td>${esc(r.owner)}</td>
        <td class="num">${r.steps}</td><td class="num">${r.tokens}</td><td class="num">${num(r.last_loss)}</td>
        <td>${esc(r.state)}</td><td title="${esc(r.last_activity)}">${ago(r.last_activity)}</td>
      </tr>`).join("") || `<tr><td colspan="${RUN_COLUMNS.length}" class="muted">No runs yet.</td></tr>`;
  };
  $("#run-filter").addEventListener("input", draw);
  $("#runs thead").addEventListener("click", (event) => {
    const key = event.target.closest("button")?.dataset.sort;
    if (!key) return;
    sorting.runs = { column: key, descending: sorting.runs.column === key ? !sorting.runs.descending : false };
    draw();
  });
  await poll(async () => {
    const latest = (await api("runs")).runs;
    if (fresh("runs", latest)) { runs = latest; draw(); }
  });
}

function checkpointTable(checkpoints, withRun) {
  if (!checkpoints.length) return `<p class="muted">No checkpoints.</p>`;
  return `<table class="checkpoints"><thead><tr>
      <th>Path</th>${withRun ? "<th>Run</th>" : ""}<th>Kind</th><th class="num">Size</th><th>Age</th><th>Expires</th>
      <th>Published</th><th>Actions</th></tr></thead><tbody>${checkpoints.map((c) => `
      <tr data-path="${esc(c.path)}">
        <td class="wrap">${esc(c.path)}</td>
        ${withRun ? `<td><a href="#/run/${encodeURIComponent(c.run_id)}">${esc(c.run_id)}</a></td>` : ""}
        <td>${esc(c.kind)}</td><td class="num">${bytes(c.size_bytes)}</td>
        <td title="${esc(c.created_at)}">${ago(c.created_at)}</td><td>${ttl(c.expires_at)}</td>
        <td>${c.published ? "yes" : "no"}</td>
        <td>
          <button type="button" data-action="download">Download</button>
          <button type="button" data-action="publish" data-published="${c.published}">${c.published ? "Unpublish" : "Publish"}</button>
          <button type="button" data-action="delete" class="danger">Delete</button>
        </td>
      </tr>`).join("")}</tbody></table>`;
}

async function checkpointAction(event, refresh) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const path = button.closest("tr").dataset.path;
  const action = button.dataset.action;
  try {
    if (action === "download") {
      const reply = await api("checkpoints/archive?path=" + encodeURIComponent(path), { raw: true });
      const name = /filename="([^"]+)"/.exec(reply.headers.get("Content-Disposition") || "")?.[1] || "checkpoint.tar";
      const link = document.createElement("a");
      link.href = URL.createObjectURL(await reply.blob());
      link.download = name;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
      return;
    }
    if (action === "publish") {
      await post("checkpoints/publish", { path, published: button.dataset.published !== "true" });
    } else if (action === "delete") {
      if (!confirm(`Delete ${path}? Its files are removed for good.`)) return;
      await post("checkpoints/delete", { path });
    }
    await refresh();
  } catch (e) {
    failed(e);
  }
}

async function runPage(runId) {
  $("#view").innerHTML = `<p><a href="#/runs">← all runs</a></p><h1 id="run-title">${esc(runId)}</h1>
    <dl class="facts" id="run-facts"></dl>
    <h2>Curves</h2><div class="charts" id="charts"></div>
    <h2>Checkpoints</h2><div id="run-checkpoints"></div>`;
  const render = async () => {
    const [detail, curves] = await Promise.all([
      api("runs/" + encodeURIComponent(runId)), api("runs/" + encodeURIComponent(runId) + "/charts"),
    ]);
    if (!fresh("run", [detail, curves.points])) return;
    const r = detail.run;
    $("#run-facts").innerHTML = [
      ["Base model", r.base_model], ["LoRA rank", r.rank], ["Owner", r.owner], ["State", r.state],
      ["Steps", r.steps], ["Tokens trained", r.tokens], ["Last loss per token", num(r.last_loss)],
      ["Created", r.created_at], ["Last activity", ago(r.last_activity)],
    ].map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("");
    $("#charts").dataset.points = curves.points;
    $("#charts").innerHTML = ["loss", "lr", "grad_norm", "tokens_per_s"]
      .map((name) => `<figure data-chart="${name}" style="margin:0">${curves.charts[name]}</figure>`).join("");
    $("#run-checkpoints").innerHTML = checkpointTable(detail.checkpoints, false);
  };
  $("#run-checkpoints").addEventListener("click", (event) => checkpointAction(event, render));
  await poll(render);
}

async function checkpointsPage() {
  $("#view").innerHTML = `<h1>Checkpoints</h1><p class="muted" id="storage"></p><div id="checkpoints"></div>`;
  const render = async () => {
    const { checkpoints } = await api("checkpoints");
    if (!fresh("checkpoints", checkpoints)) return;
    $("#storage").textContent = `${checkpoints.length} checkpoints, ${bytes(checkpoints.reduce((s, c) => s + c.size_bytes, 0))}`;
    $("#checkpoints").innerHTML = checkpointTable(checkpoints, true);
  };
  $("#checkpoints").addEventListener("click", (event) => checkpointAction(event, render));
  await poll(render);
}

async function samplersPage() {
  $("#view").innerHTML = `<h1>Sampler sessions</h1><div id="samplers"></div>`;
  await poll(async () => {
    const { samplers } = await api("samplers");
    if (!fresh("samplers", samplers)) return;
    $("#samplers").innerHTML = samplers.length ? `<table><thead><tr><th>Sampler</th><th>Base model</th>
      <th>Weights</th><th>Loaded</th><th>Created</th></tr></thead><tbody>${samplers.map((s) => `<tr>
      <td>${esc(s.sampler_id)}</td><td>${esc(s.base_model)}</td><td class="wrap">${esc(s.model_path || "base model")}</td>
      <td>${s.loaded ? "yes" : "no"}</td><td title="${esc(s.created_at)}">${ago(s.created_at)}</td></tr>`).join("")}</tbody></table>`
      : `<p class="muted">No sampler sessions.</p>`;
  });
}

async function serverPage() {
  $("#view").innerHTML = `<h1>Server</h1><dl class="facts" id="server-facts"></dl><h2>Base models</h2><div id="models"></div>`;
  await poll(async () => {
    const s = await api("server");
    if (!fresh("server", s)) return;
    $("#server-facts").innerHTML = [
      ["Adapter slots per model", s.adapter_slots], ["Live sessions", s.sessions_live],
      ["Memory (resident)", s.memory.rss_bytes ? bytes(s.memory.rss_bytes) : "–"],
      ["Memory (peak)", s.memory.peak_rss_bytes ? bytes(s.memory.peak_rss_bytes) : "–"],
    ].map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("");
    $("#models").innerHTML = s.models.length ? `<table><thead><tr><th>Base model</th><th>Loaded</th><th>Device</th>
      <th class="num">Runs</th><th class="num">Queue</th><th class="num">In slots</th><th class="num">Offloaded (host / disk)</th>
      <th class="num">Slot hits / misses / offloads</th><th class="num">Device memory</th></tr></thead><tbody>${s.models.map((m) => {
        const t = m.tiers || {}, e = m.slot_events || {};
        return `<tr><td>${esc(m.base_model)}</td><td>${m.loaded ? "yes" : "no"}</td><td>${esc(m.device || "–")}</td>
        <td class="num">${m.runs}</td><td class="num">${m.queue_depth}</td><td class="num">${t.slots ?? "–"}</td>
        <td class="num">${t.host ?? "–"} / ${t.disk ?? "–"}</td><td class="num">${e.hit ?? "–"} / ${e.miss ?? "–"} / ${e.offload ?? "–"}</td>
        <td class="num">${m.device_memory_bytes === undefined ? "–" : bytes(m.device_memory_bytes)}</td></tr>`;
      }).join("")}</tbody></table>` : `<p class="muted">No base model loaded yet.</p>`;
  });
}

// --- routing ---

async function route() {
  stopPolling();
  if (!sessionStorage.getItem(KEY)) return showSignIn();
  if (me === null) {
    try { await signIn(sessionStorage.getItem(KEY)); } catch (e) { return showSignIn("Your key was refused: " + e.message); }
  }
  showNav();
  const [, page, arg] = location.hash.split("/");
  try {
    if (page === "run" && arg) await runPage(decodeURIComponent(arg));
    else if (page === "checkpoints") await checkpointsPage();
    else if (page === "samplers") await samplersPage();
    else if (page === "server" && me.admin) await serverPage();
    else await runsPage();
  } catch (e) {
    failed(e);
  }
  $("#main").focus({ preventScroll: true });
}

document.addEventListener("DOMContentLoaded", () => {
  $("#signin-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await signIn($("#api-key").value.trim());
    } catch (e) {
      showSignIn(e.status === 401 ? "That key was refused." : e.message);
      return;
    }
    $("#api-key").value = "";
    if (location.hash === "" || location.hash === "#/runs") route(); else location.hash = "#/runs";
  });
  $("#sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    me = null;
    showSignIn();
  });
  window.addEventListener("hashchange", route);
  route();
});

// The status page's script: reads /v1/status and /v1/dead-letters every 5 seconds and draws
// them. Everything from the agent is set with textContent, never as HTML: dead-letter reasons
// quote what remote servers answered.
"use strict";

const REFRESH_MS = 5000;
const TOKEN_KEY = "estafeta-token";

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const t = token();
  if (t) headers["Authorization"] = "Bearer " + t;
  const response = await fetch(path, Object.assign({}, options, { headers, cache: "no-store" }));
  if (response.status === 401) throw new Unauthorized();
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.message || "HTTP " + response.status);
  return body;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function ago(secs) {
  if (secs === null || secs === undefined) return "–";
  if (secs < 60) return secs + " s";
  if (secs < 3600) return Math.floor(secs / 60) + " min";
  if (secs < 86400) return (secs / 3600).toFixed(1) + " h";
  return (secs / 86400).toFixed(1) + " days";
}

function since(rfc3339) {
  if (!rfc3339) return "–";
  const secs = Math.max(0, Math.round((Date.now() - Date.parse(rfc3339)) / 1000));
  return ago(secs) + " ago";
}

function bytes(n) {
  if (n === null || n === undefined) return "unknown";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

// Records delivered per second over the last minute, as the agent counts them.
function rate(perSec) {
  if (perSec === null || perSec === undefined) return "–";
  return (perSec >= 10 ? Math.round(perSec).toLocaleString("en") : perSec.toFixed(1)) + " /s";
}

// Pending ÷ drain rate; the agent sends no time while nothing is being delivered.
function timeToEmpty(sink) {
  if (sink.pending + sink.in_flight === 0) return "empty";
  if (sink.time_to_empty_secs === null || sink.time_to_empty_secs === undefined) return "not draining";
  return "about " + ago(sink.time_to_empty_secs);
}

function fillRows(tableId, rows, empty) {
  const body = document.querySelector("#" + tableId + " tbody");
  body.replaceChildren();
  if (rows.length === 0) {
    const tr = el("tr");
    const td = el("td", empty, "muted");
    td.colSpan = document.querySelectorAll("#" + tableId + " thead th").length;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const cells of rows) {
    const tr = el("tr");
    for (const cell of cells) tr.append(cell);
    body.append(tr);
  }
}

function describeUpdate(update) {
  if (!update) return "automatic updates not configured (UPDATE_URL)";
  const parts = [update.state || "unknown"];
  if (update.available) parts.push("available: " + update.available);
  if (update.last_check) parts.push("last check " + since(update.last_check));
  if (update.message) parts.push(update.message);
  return parts.join(" · ");
}

function drawStatus(s) {
  const waiting = s.sinks.reduce((n, k) => n + k.pending + k.in_flight, 0);
  const dead = s.sinks.reduce((n, k) => n + k.dead, 0);
  document.getElementById("summary").textContent =
    waiting + " waiting to be delivered · " + dead + (dead === 1 ? " dead letter" : " dead letters") +
    " · disk free " + bytes(s.disk_free_bytes);

  const alert = document.getElementById("alert");
  const problems = [];
  if (s.staging_blocked) problems.push("New records are refused (HTTP 507): " + s.staging_blocked + ". Records already staged are safe and delivery goes on.");
  if (s.shutting_down) problems.push("The agent is shutting down.");
  for (const q of s.sources || []) {
    if (q.outcome === "error") problems.push("Source " + q.name + " failed its last cycle; it runs again at the next tick.");
  }
  alert.hidden = problems.length === 0;
  alert.textContent = problems.join(" ");

  const agent = document.getElementById("agent");
  agent.replaceChildren();
  const facts = [
    ["Version", s.version],
    ["Up for", ago(s.uptime_secs)],
    ["Updates", describeUpdate(s.update)],
    ["Staging folder", s.root],
    ["Disk free", bytes(s.disk_free_bytes) + " (new records refused below " + bytes(s.min_free_disk_bytes) + ")"],
    ["Staged on disk", bytes(s.bytes_staged)],
    ["Memory", bytes(s.memory_rss_bytes)],
    ["Dry run", s.dry_run ? "yes: nothing is sent" : "no"],
  ];
  for (const [name, value] of facts) agent.append(el("dt", name), el("dd", value));

  fillRows("sinks", s.sinks.map((k) => [
    el("td", k.sink),
    el("td", k.pending, "num"),
    el("td", k.in_flight, "num"),
    el("td", k.dead, k.dead ? "num bad" : "num"),
    el("td", rate(k.drain_rate_per_sec), "num"),
    el("td", timeToEmpty(k), k.time_to_empty_secs === null && k.pending + k.in_flight > 0 ? "bad" : ""),
    // TLS or not, verified or not: anything short of verified TLS across a network is shown as a problem.
    el("td", k.connection ? k.connection.description : "–",
      k.connection && !k.connection.verified && k.connection.setting !== "local file" ? "bad" : ""),
    el("td", ago(k.oldest_pending_age_secs)),
    el("td", since(k.last_success_at), k.last_success_at ? "ok" : ""),
    el("td", since(k.last_failure_at)),
    el("td", k.next_attempt_at ? k.next_attempt_at.replace("T", " ").replace(/\..*/, "") + " UTC" : "–"),
    el("td", k.last_error || "", "error"),
  ]), "No sinks.");

  // The SQL sources' last cycles, as the running agent saw them. The lag is the age of the
  // newest row staged (time checkpoint) or the time since the source was last caught up.
  fillRows("sources", (s.sources || []).map((q) => [
    el("td", q.name),
    el("td", q.running ? "running now" : since(q.last_run_finished_at)),
    el("td", q.outcome || "not run yet", q.outcome === "error" ? "bad" : q.outcome === "ok" ? "ok" : "muted"),
    el("td", q.last_rows + " / " + q.rows_total, "num"),
    el("td", q.records_total, "num"),
    el("td", q.refused_total, q.refused_total ? "num bad" : "num"),
    el("td", q.lag_secs === null || q.lag_secs === undefined ? "–"
      : ago(q.lag_secs) + (q.lag_from === "newest_row" ? " (newest row)" : " (since caught up)")),
    el("td", since(q.last_success_at)),
    el("td", q.last_error || "", "error"),
  ]), "No SQL sources.");

  fillRows("groups", (s.groups || []).map((g) => [
    el("td", g.action),
    el("td", g.entity),
    el("td", g.pending, "num"),
    el("td", g.dead, g.dead ? "num bad" : "num"),
    el("td", ago(g.oldest_pending_age_secs)),
  ]), "Nothing pending.");
}

async function requeue(sink, seq, button) {
  button.disabled = true;
  const result = document.getElementById("requeue-result");
  try {
    await api("/v1/dead-letters/" + encodeURIComponent(sink) + "/" + seq + "/requeue", {
      method: "POST",
      headers: { "X-Requested-By": "estafeta" },
    });
    result.textContent = "Requeued record " + seq + " for sink " + sink + ": it goes out with the next delivery.";
  } catch (e) {
    result.textContent = "Could not requeue record " + seq + ": " + e.message;
    button.disabled = false;
  }
  refresh();
}

function drawDead(list) {
  fillRows("dead", list.dead_letters.map((d) => {
    const button = el("button", "Requeue", "requeue");
    button.type = "button";
    button.dataset.sink = d.sink;
    button.dataset.seq = d.seq;
    button.addEventListener("click", () => requeue(d.sink, d.seq, button));
    const action = el("td");
    action.append(button);
    return [
      el("td", d.sink),
      el("td", d.seq, "num"),
      el("td", d.entity),
      el("td", d.action),
      el("td", d.key === null ? "–" : d.key),
      el("td", d.failed_at),
      el("td", d.reason, "reason"),
      action,
    ];
  }), "No dead letters.");
}

async function refresh() {
  const refreshed = document.getElementById("refreshed");
  try {
    const [status, dead] = await Promise.all([api("/v1/status"), api("/v1/dead-letters?limit=100")]);
    document.getElementById("login").hidden = true;
    drawStatus(status);
    drawDead(dead);
    refreshed.textContent = "Updated " + new Date().toLocaleTimeString() + "; refreshes every 5 s.";
  } catch (e) {
    if (e instanceof Unauthorized) {
      document.getElementById("login").hidden = false;
      refreshed.textContent = "This agent needs its token.";
    } else {
      refreshed.textContent = "The agent does not answer (" + e.message + "); trying again in 5 s.";
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
    refresh();
  });
  refresh();
  setInterval(refresh, REFRESH_MS);
});

// panal status page: renders GET v1/status, live over Server-Sent Events (v1/events), falling back to
// periodic fetches. No dependencies, no build step. Every value from the board goes in as text, never as HTML.
"use strict";

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "style") node.style.cssText = value;  // CSSOM: allowed by the page's CSP
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  seconds = Math.max(0, seconds);
  if (seconds < 90) return `${Math.round(seconds)}s`;
  if (seconds < 90 * 60) return `${Math.round(seconds / 60)}m`;
  if (seconds < 48 * 3600) return `${(seconds / 3600).toFixed(1).replace(/\.0$/, "")}h`;
  return `${(seconds / 86400).toFixed(1).replace(/\.0$/, "")}d`;
}

const shortId = (id) => (id ? String(id).slice(0, 12) : "–");
const clock = (epoch) => new Date(epoch * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

// A speed as [three significant digits, unit]: a CPU fleet reads "3.00 GFLOPS", not "0.00 TFLOPS".
function flops(gflops) {
  const units = ["MFLOPS", "GFLOPS", "TFLOPS", "PFLOPS", "EFLOPS"];
  let value = gflops * 1000, unit = 0;
  while (unit < units.length - 1 && Number(value.toPrecision(3)) >= 1000) { value /= 1000; unit += 1; }
  return [value.toPrecision(3), units[unit]];
}

// The compute card: measured fp32 speed online, its unit in the card's title.
function renderCompute(status) {
  const gflops = (status.tflops_online || 0) * 1000;
  const [value, unit] = gflops > 0 ? flops(gflops) : [(status.agents || {}).online ? "not measured" : 0, "compute"];
  fill("compute-unit", `${unit} online`);
  fill("n-compute", value);
}

// Task counts for the Work cards: the board's active tasks plus those of the finished jobs listed.
const ACTIVE_JOB_STATES = new Set(["queued", "running"]);
function workCounts(status) {
  const counts = { ...(status.tasks || {}) };
  for (const job of status.job_table || []) {
    if (ACTIVE_JOB_STATES.has(job.state)) continue;   // already in status.tasks
    for (const [state, n] of Object.entries(job.tasks || {})) counts[state] = (counts[state] || 0) + n;
  }
  return counts;
}

function progressBar(fraction, label, name) {
  const pct = Math.round(Math.max(0, Math.min(1, fraction || 0)) * 100);
  return el("div", { class: "bar" },
    el("div", { class: "track", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct,
                "aria-label": name },
      el("div", { class: "fill", style: `width:${pct}%` })),
    el("span", { class: "label" }, label));
}

// -- state ----------------------------------------------------------------------------------------
const view = { status: null, events: [], selectedJob: null, sortKey: "state", sortDir: 1,
               agentOffset: 0, agentPage: null, agentLoading: false,
               jobOffset: 0, jobPage: null, jobLoading: false };

// The searches and pages a viewer asked for; the board filters (server-side, bounded), the page only asks.
const agentFilter = () => ({ agents_q: $("#agents-q").value.trim(), agents_state: $("#agents-state").value });
const jobFilter = () => ({ jobs_q: $("#jobs-q").value.trim(), jobs_state: $("#jobs-state").value,
                           jobs_kind: $("#jobs-kind").value });
const filtered = (f) => Object.values(f).some((v) => v);
const agentsOwnPage = () => view.agentOffset > 0 || filtered(agentFilter());
const jobsOwnPage = () => view.jobOffset > 0 || filtered(jobFilter());

function query(params) {
  return Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined)
    .map(([k, v]) => `${k}=${encodeURIComponent(v)}`).join("&");
}

function fill(id, value) {
  const node = document.getElementById(id);
  if (node) node.textContent = String(value);
}

// -- rendering ------------------------------------------------------------------------------------
function render(status) {
  view.status = status;
  view.events = status.events || [];
  const a = status.agents || {};
  for (const key of ["online", "idle", "busy", "offline", "quarantined"]) fill(`n-${key}`, a[key] ?? 0);
  renderCompute(status);
  const t = workCounts(status);
  for (const key of ["queued", "leased", "done", "failed"]) fill(`n-${key}`, t[key] ?? 0);
  fill("n-jobs", (status.jobs || {}).active ?? 0);
  renderGpus(status.gpus || []);
  renderMap(status.agent_table || []);
  renderKinds(status.kinds || []);
  if (jobsOwnPage()) loadJobPage(); else { view.jobPage = null; renderJobsView(); }
  if (agentsOwnPage()) loadAgentPage(); else { view.agentPage = null; renderAgents(); }
  renderEvents();
  drawChart();
  drawHistory();
  renderHistoryTable();
  if (view.selectedJob) loadJob(view.selectedJob);
}

function renderGpus(gpus) {
  const list = $("#gpus");
  list.replaceChildren(...(gpus.length ? gpus.map((g) => el("li", {}, `${g.count} × ${g.model}`))
    : [el("li", { class: "muted" }, "none online")]));
}

function renderMap(agents) {
  const online = agents.filter((x) => x.state !== "offline");
  $("#fleet-map").replaceChildren(...(online.length ? online.map((x) => el("li", { "data-state": x.state },
    el("strong", {}, x.name), " ", el("span", { class: `state state-${x.state}` }, x.state), el("br"),
    x.running.length ? x.running.map((r) => `${r.job_name} #${r.idx} (${Math.round(r.progress * 100)}%)`).join(", ")
      : el("span", { class: "muted" }, x.quarantine ? x.quarantine : "no task"))) : [el("li", { class: "muted" }, "no agent online")]));
}

function jobProgressLabel(job) {
  const c = job.tasks || {};
  const failed = c.failed ? `, ${c.failed} failed` : "";
  return `${c.done || 0}/${job.n_tasks}${failed}`;
}

// A job's best task by the metric its manifest names (spec.report): index, metric and value, never params.
function bestLabel(best) {
  return `best #${best.unit}: ${best.metric} ${Number(Number(best.value).toPrecision(4))} (${best.mode})`;
}

function renderJobs(jobs, now) {
  const body = $("#job-table tbody");
  if (!jobs.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 8, class: "muted" },
      filtered(jobFilter()) ? "no job matches" : "no jobs yet")));
    return;
  }
  body.replaceChildren(...jobs.map((job) => {
    const open = () => selectJob(job.id);
    return el("tr", { id: `job-${job.id}`, "data-job-id": job.id, "data-state": job.state,
                      "aria-selected": view.selectedJob === job.id ? "true" : "false", onclick: open },
      el("td", {}, el("button", { type: "button", class: "link", onclick: (e) => { e.stopPropagation(); open(); } },
        job.name || job.id), el("br"), el("code", { class: "muted" }, job.id),
        job.best ? [el("br"), el("span", { class: "best", "data-best-unit": job.best.unit }, bestLabel(job.best))] : null),
      el("td", {}, el("span", { class: `state state-${job.state}` }, job.state),
        job.waiting_because && job.waiting_because.length ? el("span", { class: "muted" }, " (waiting)") : null,
        job.quorum > 1 ? el("span", { class: "muted", title: "instances that must agree" }, ` quorum ${job.quorum}`) : null,
        job.tasks && job.tasks.invalid ? el("span", { class: "state state-failed" }, ` ${job.tasks.invalid} invalid`) : null),
      el("td", {}, progressBar(job.progress, jobProgressLabel(job), `progress of ${job.name || job.id}`)),
      el("td", { class: "wide" }, job.kind),
      el("td", { class: "wide" }, el("code", { title: job.submitter }, shortId(job.submitter))),
      el("td", { class: "wide" }, job.priority),
      el("td", {}, duration((job.finished_at || now) - job.created_at)),
      el("td", {}, job.finished_at ? "–" : duration(job.eta_s)));
  }));
}

function devices(agent) {
  const gpus = agent.gpus.map((g) => `${g.name} ${g.vram_gb ? `${g.vram_gb} GB` : ""} (${g.backend})`.replace("  ", " "));
  return [...gpus, `CPU ${agent.cpu.cores} cores`].join(", ");
}

function sortValue(agent, key) {
  if (key === "devices") return devices(agent);
  return agent[key];
}

// A search the board refuses (429: this address asked for too many new searches; any other error) is said
// beside its form instead of silently keeping the last results, and a 429 is asked again when the board says.
const refusedRetry = {};
async function pageReply(which, resp, again) {
  const note = $(`#${which}s-note`);
  if (resp.ok) { note.hidden = true; note.textContent = ""; return resp.json(); }
  let message = `the board did not answer this search (HTTP ${resp.status})`;
  try { const body = await resp.json(); if (body && body.message) message = String(body.message); } catch (err) { /* not JSON */ }
  note.textContent = message;
  note.hidden = false;
  if (resp.status === 429 && !refusedRetry[which]) {
    const wait = Math.min(Math.max(Number(resp.headers.get("Retry-After")) || 5, 1), 300);
    refusedRetry[which] = setTimeout(() => { refusedRetry[which] = null; again(); }, wait * 1000);
  }
  return null;
}

// The agent table is paged by the board (a fleet may be 100k agents): the live stream carries the first
// page; another page is fetched from v1/status when shown, and again on each update while it is.
async function loadAgentPage() {
  if (view.agentLoading) { view.agentAgain = true; return; }
  view.agentLoading = true;
  const limit = ((view.status && view.status.agent_page) || {}).limit || 50;
  const want = query({ agents_offset: view.agentOffset, agents_limit: limit, jobs_limit: 0, ...agentFilter() });
  try {
    const resp = await fetch(`v1/status?${want}`, { headers: { Accept: "application/json" }, cache: "no-store" });
    const page = await pageReply("agent", resp, loadAgentPage);
    if (page && want === query({ agents_offset: view.agentOffset, agents_limit: limit, jobs_limit: 0, ...agentFilter() })) {
      view.agentPage = page;
    }
  } finally {
    view.agentLoading = false;
  }
  renderAgents();   // always: a page that arrives is shown, even while updates keep asking for newer ones
  if (view.agentAgain) { view.agentAgain = false; loadAgentPage(); }
}

function turnAgentPage(direction) {
  const page = (view.agentPage || view.status || {}).agent_page;
  if (!page) return;
  view.agentOffset = Math.max(0, Math.min(view.agentOffset + direction * page.limit, Math.max(0, page.total - 1)));
  if (agentsOwnPage()) loadAgentPage(); else { view.agentPage = null; renderAgents(); }
}

function renderPager(which, page) {
  const pager = $(`#${which}-pager`);
  pager.hidden = !page || (page.total <= page.limit && page.offset === 0);
  if (pager.hidden) return;
  fill(`${which}s-range`, page.total ? `${page.offset + 1}–${Math.min(page.offset + page.limit, page.total)} of ${page.total}`
    : "none match");
  $(`#${which}s-prev`).disabled = page.offset === 0;
  $(`#${which}s-next`).disabled = page.offset + page.limit >= page.total;
}

// Jobs: the stream's first page, or the viewer's own search/page from v1/status (again on each update).
async function loadJobPage() {
  if (view.jobLoading) { view.jobAgain = true; return; }
  view.jobLoading = true;
  const limit = 50;
  const want = () => query({ jobs_offset: view.jobOffset, jobs_limit: limit, agents_limit: 0, ...jobFilter() });
  const asked = want();
  try {
    const resp = await fetch(`v1/status?${asked}`, { headers: { Accept: "application/json" }, cache: "no-store" });
    const page = await pageReply("job", resp, loadJobPage);
    if (page && asked === want()) view.jobPage = page;
  } finally {
    view.jobLoading = false;
  }
  renderJobsView();
  if (view.jobAgain) { view.jobAgain = false; loadJobPage(); }
}

function turnJobPage(direction) {
  const page = (view.jobPage || view.status || {}).job_page;
  if (!page) return;
  view.jobOffset = Math.max(0, Math.min(view.jobOffset + direction * page.limit, Math.max(0, page.total - 1)));
  if (jobsOwnPage()) loadJobPage(); else { view.jobPage = null; renderJobsView(); }
}

function renderJobsView() {
  if (!jobsOwnPage()) $("#jobs-note").hidden = true;   // back on the stream's page: no search of its own to refuse
  const shown = jobsOwnPage() && view.jobPage ? view.jobPage : view.status;
  if (!shown) return;
  renderPager("job", shown.job_page);
  renderJobs(shown.job_table || [], shown.generated_at);
}

function searchChanged(which) {
  if (which === "agent") { view.agentOffset = 0; view.agentPage = null; loadAgentPage(); }
  else { view.jobOffset = 0; view.jobPage = null; loadJobPage(); }
}

function renderAgents() {
  if (!agentsOwnPage()) $("#agents-note").hidden = true;
  const shown = agentsOwnPage() && view.agentPage ? view.agentPage : view.status;
  renderPager("agent", shown && shown.agent_page);
  const agents = [...((shown && shown.agent_table) || [])];
  const { sortKey, sortDir } = view;
  agents.sort((x, y) => {
    const a = sortValue(x, sortKey), b = sortValue(y, sortKey);
    const cmp = typeof a === "number" && typeof b === "number" ? a - b : String(a).localeCompare(String(b));
    return cmp * sortDir || String(x.name).localeCompare(String(y.name));
  });
  for (const th of document.querySelectorAll("#agent-table th[data-key]")) {
    th.setAttribute("aria-sort", th.dataset.key === sortKey ? (sortDir > 0 ? "ascending" : "descending") : "none");
  }
  const now = view.status ? view.status.generated_at : Date.now() / 1000;
  const body = $("#agent-table tbody");
  if (!agents.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 9, class: "muted" },
      filtered(agentFilter()) ? "no agent matches" : "no agents registered")));
    return;
  }
  body.replaceChildren(...agents.map((x) => el("tr", { "data-agent-id": x.id },
    el("td", {}, x.name),
    el("td", {}, el("span", { class: `state state-${x.state}`, title: x.quarantine || "" }, x.state)),
    el("td", { class: "wide" }, devices(x)),
    el("td", {}, x.done),
    el("td", { class: "wide" }, `${(x.error_rate * 100).toFixed(1)}%`),
    el("td", { class: "wide" }, x.credit.toFixed(x.credit >= 100 ? 0 : 2)),
    el("td", { class: "wide" }, x.invalid_results),
    el("td", {}, `${duration(now - x.last_seen)} ago`),
    el("td", { class: "wide" }, el("code", { title: x.id }, shortId(x.id))))));
}

// Each event reads as a sentence naming things by name; the job's id follows as a detail.
const EVENT_TEXT = {
  agent_joined: (e) => `agent ${e.name || shortId(e.agent)} joined`,
  agent_left: (e) => `agent ${e.name || shortId(e.agent)} went offline`,
  agent_quarantined: (e) => `agent ${e.name || shortId(e.agent)} quarantined: ${e.reason || ""}`,
  agent_released: (e) => `agent ${e.name || shortId(e.agent)} released from quarantine`,
  job_submitted: (e) => `job ${e.name || e.job} submitted (${plural(e.tasks, "task")})`,
  job_finished: (e) => `job ${e.name || e.job} finished: ${e.state}`,
  lease_expired: (e) => `lease of task ${e.task} expired on agent ${shortId(e.agent)}`,
};

function renderEvents() {
  const recent = view.events.slice(-30).reverse();
  $("#event-list").replaceChildren(...(recent.length ? recent.map((e) => el("li", { "data-type": e.type },
    el("time", { datetime: new Date(e.at * 1000).toISOString() }, clock(e.at)),
    (EVENT_TEXT[e.type] || ((x) => x.type))(e),
    e.job && e.name ? [" ", el("code", { class: "muted", title: e.job }, shortId(e.job))] : null))
    : [el("li", { class: "muted" }, "nothing yet")]));
}

// -- job detail -----------------------------------------------------------------------------------
function selectJob(jobId) {
  view.selectedJob = jobId;
  for (const row of document.querySelectorAll("#job-table tbody tr")) {
    row.setAttribute("aria-selected", row.dataset.jobId === jobId ? "true" : "false");
  }
  $("#job-detail").hidden = false;
  loadJob(jobId);
}

async function loadJob(jobId) {
  let detail;
  try {
    const resp = await fetch(`v1/jobs/${encodeURIComponent(jobId)}/public`, { headers: { Accept: "application/json" } });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    detail = await resp.json();
  } catch (err) {
    $("#job-waiting").replaceChildren(el("li", {}, `could not load the job: ${err.message}`));
    return;
  }
  if (view.selectedJob !== jobId) return;
  const job = detail.job;
  $("#job-detail-h").textContent = `Job ${job.name || job.id}: ${job.state}, ${jobProgressLabel(job)}`;
  $("#job-detail").dataset.jobId = job.id;
  $("#job-waiting").replaceChildren(...detail.waiting_because.map((line) => el("li", {}, `waiting: ${line}`)));
  const best = job.best;
  $("#job-best").hidden = !best;
  $("#job-best").textContent = best ? bestLabel(best) : "";
  $("#task-table tbody").replaceChildren(...detail.tasks.map((t) => el("tr", { "data-idx": t.idx, "data-state": t.state,
                                                                               "data-best": best && best.unit === t.idx },
    el("td", {}, t.idx, best && best.unit === t.idx ? el("span", { class: "best" }, " best") : null),
    el("td", {}, el("span", { class: `state state-${t.state}` }, t.state)),
    el("td", {}, t.attempt),
    el("td", {}, t.agent_name || shortId(t.agent)),
    el("td", {}, progressBar(t.progress, `${Math.round(t.progress * 100)}%`, `progress of task ${t.idx}`)),
    el("td", { class: "wide" }, t.error_class || ""))));
  if (detail.truncated) {
    $("#task-table tbody").append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, `first ${detail.tasks.length} of ${job.n_tasks} tasks`)));
  }
}

// -- per kind: backlog, running, recent run times, failure rate, why work waits -------------------
function renderKinds(kinds) {
  const select = $("#jobs-kind"), chosen = select.value;
  const names = [...new Set([...kinds.map((k) => k.kind), ...(chosen ? [chosen] : [])])].sort();
  if (names.join("\n") !== [...select.options].slice(1).map((o) => o.value).join("\n")) {
    select.replaceChildren(el("option", { value: "" }, "any"), ...names.map((k) => el("option", { value: k }, k)));
    select.value = chosen;
  }
  const body = $("#kind-table tbody");
  if (!kinds.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "no work yet")));
    return;
  }
  body.replaceChildren(...kinds.map((k) => el("tr", { "data-kind": k.kind },
    el("td", {}, el("strong", {}, k.kind), el("br"), el("span", { class: "muted" }, plural(k.jobs, "active job"))),
    el("td", { class: "n-queued" }, k.queued),
    el("td", { class: "n-running" }, k.running),
    el("td", { class: "run-times" }, k.run_s_median === null ? "–" : `${duration(k.run_s_median)} / ${duration(k.run_s_p90)}`),
    el("td", { class: "failure-rate" }, k.failure_rate === null ? "–" : `${(k.failure_rate * 100).toFixed(1)}%`),
    el("td", {}, k.waiting_because.length ? el("ul", { class: "why" }, k.waiting_because.map((line) => el("li", {}, line)))
      : el("span", { class: "muted" }, k.queued ? "being handed out" : "–")))));
}

// -- the last 24 hours (10-minute buckets, kept by the board across restarts) ----------------------
function historyRows() {
  const h = (view.status && view.status.history) || null;
  if (!h) return [];
  return h.done.map((done, i) => ({ start: h.start + i * h.bucket_s, done, failed: h.failed[i], agents: h.agents[i],
                                    backlog: h.backlog[i] }));
}

function renderHistoryTable() {
  const rows = historyRows().filter((r) => r.done || r.failed || r.agents || r.backlog).reverse();
  $("#history-table tbody").replaceChildren(...(rows.length ? rows.map((r) => el("tr", { "data-start": r.start },
    el("td", {}, el("time", { datetime: new Date(r.start * 1000).toISOString() }, clock(r.start).slice(0, 5))),
    el("td", {}, r.done), el("td", {}, r.failed), el("td", {}, r.agents), el("td", {}, r.backlog)))
    : [el("tr", {}, el("td", { colspan: 5, class: "muted" }, "nothing in the last 24 hours"))]));
}

// A cleared canvas at the screen's pixel density, its plot area inside the axis margins, and the theme's
// colours (both charts are drawn by hand on one of these).
function chartArea(canvas) {
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300, height = canvas.clientHeight || 160;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const ctx = canvas.getContext("2d");
  if (!ctx) return null;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const pad = { left: 34, right: 8, top: 10, bottom: 20 };
  return { ctx, color, width, height, pad, w: width - pad.left - pad.right, h: height - pad.top - pad.bottom };
}

function drawHistory() {
  const rows = historyRows();
  const canvas = $("#history");
  const area = chartArea(canvas);
  if (!area) return;
  const { ctx, color, width, height, pad, w, h } = area;
  const max = Math.max(1, ...rows.map((r) => r.done + r.failed));
  const maxAgents = Math.max(1, ...rows.map((r) => r.agents));
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = color("--muted");
  ctx.textAlign = "right";
  ctx.fillText(String(max), pad.left - 4, pad.top + 8);
  ctx.fillText("0", pad.left - 4, pad.top + h);
  ctx.textAlign = "left";
  ctx.fillText("-24h", pad.left, height - 5);
  ctx.textAlign = "right";
  ctx.fillText("now", pad.left + w, height - 5);
  const slot = w / Math.max(rows.length, 1);
  rows.forEach((r, i) => {
    const x = pad.left + i * slot, bw = Math.max(1, slot - 1);
    const hd = (r.done / max) * h, hf = (r.failed / max) * h;
    ctx.fillStyle = color("--chart-done");
    ctx.fillRect(x, pad.top + h - hd, bw, hd);
    ctx.fillStyle = color("--chart-failed");
    ctx.fillRect(x, pad.top + h - hd - hf, bw, hf);
  });
  ctx.strokeStyle = color("--accent");          // agents connected, scaled to their own peak
  ctx.beginPath();
  rows.forEach((r, i) => {
    const x = pad.left + (i + 0.5) * slot, y = pad.top + h - (r.agents / maxAgents) * h;
    if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
  });
  ctx.stroke();
  const done = rows.reduce((s, r) => s + r.done, 0), failed = rows.reduce((s, r) => s + r.failed, 0);
  const text = `Last 24 hours: ${plural(done, "task")} done, ${plural(failed, "failed attempt")}; `
    + `peak ${max} per 10 minutes; up to ${plural(Math.max(0, ...rows.map((r) => r.agents)), "agent")} connected (line)`;
  canvas.setAttribute("aria-label", text);
  $("#history-caption").textContent = text;
}

// -- throughput chart (canvas, drawn by hand) -----------------------------------------------------
function drawChart() {
  const canvas = $("#throughput");
  const points = (view.status && view.status.throughput) || [];
  const area = chartArea(canvas);
  if (!area) return;
  const { ctx, color, width, height, pad, w, h } = area;
  const max = Math.max(1, ...points.map((p) => p.done + p.failed));
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = color("--muted");
  ctx.strokeStyle = color("--line");
  ctx.beginPath();
  ctx.moveTo(pad.left, pad.top + h + 0.5);
  ctx.lineTo(pad.left + w, pad.top + h + 0.5);
  ctx.moveTo(pad.left, pad.top + 0.5);
  ctx.lineTo(pad.left + w, pad.top + 0.5);
  ctx.stroke();
  ctx.textAlign = "right";
  ctx.fillText(String(max), pad.left - 4, pad.top + 8);
  ctx.fillText("0", pad.left - 4, pad.top + h);
  ctx.textAlign = "left";
  ctx.fillText("-60m", pad.left, height - 5);
  ctx.textAlign = "center";
  ctx.fillText("-30m", pad.left + w / 2, height - 5);
  ctx.textAlign = "right";
  ctx.fillText("now", pad.left + w, height - 5);
  const slot = w / Math.max(points.length, 1);
  points.forEach((p, i) => {
    const x = pad.left + i * slot + 1, bw = Math.max(1, slot - 2);
    const hd = (p.done / max) * h, hf = (p.failed / max) * h;
    ctx.fillStyle = color("--chart-done");
    ctx.fillRect(x, pad.top + h - hd, bw, hd);
    ctx.fillStyle = color("--chart-failed");
    ctx.fillRect(x, pad.top + h - hd - hf, bw, hf);
  });
  const done = points.reduce((s, p) => s + p.done, 0), failed = points.reduce((s, p) => s + p.failed, 0);
  const last = points.length ? points[points.length - 1] : { done: 0, failed: 0 };
  const text = `Last hour: ${plural(done, "task")} finished, ${plural(failed, "failed attempt")}; this minute: ${last.done}; `
    + `peak ${max}/min`;
  canvas.setAttribute("aria-label", text);
  $("#throughput-caption").textContent = text;
}

// -- live connection: SSE, with fallback to polling and a visible disconnected state -------------
const conn = { es: null, retryMs: 1000, retryTimer: null, watchdog: null, sseFailures: 0, polls: 0, mode: "sse" };
const MAX_RETRY_MS = 5000;
const POLL_MS = 5000;

function setConn(state, text) {
  const node = $("#conn");
  node.dataset.state = state;
  node.textContent = text;
}

function armWatchdog(status) {
  clearTimeout(conn.watchdog);
  const limit = ((status && status.snapshot_interval_s) || 2) * 3000 + 2000;
  conn.watchdog = setTimeout(() => { if (conn.es) { conn.es.close(); conn.es = null; } lost(); }, limit);
}

function connect() {
  clearTimeout(conn.retryTimer);
  if (!("EventSource" in window) || conn.mode === "poll") { poll(); return; }
  const es = new EventSource("v1/events");
  conn.es = es;
  es.addEventListener("status", (e) => {
    const status = JSON.parse(e.data);
    conn.retryMs = 1000;
    conn.sseFailures = 0;
    setConn("live", "live");
    armWatchdog(status);
    render(status);
  });
  es.addEventListener("board", (e) => {
    view.events.push(JSON.parse(e.data));
    renderEvents();
  });
  es.onerror = () => {
    es.close();
    if (conn.es !== es) return;
    conn.es = null;
    clearTimeout(conn.watchdog);
    lost();
  };
}

function lost() {
  clearTimeout(conn.retryTimer);
  setConn("down", `disconnected, retrying in ${Math.round(conn.retryMs / 1000)}s…`);
  conn.retryTimer = setTimeout(retry, conn.retryMs);
  conn.retryMs = Math.min(conn.retryMs * 2, MAX_RETRY_MS);
}

async function fetchStatus() {
  const resp = await fetch("v1/status", { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
  return resp.json();
}

async function retry() {
  let status;
  try {
    status = await fetchStatus();
  } catch (err) {
    lost();
    return;
  }
  render(status);
  conn.retryMs = 1000;
  conn.sseFailures += 1;   // the board answers, but the stream failed: after a few, poll instead
  if (conn.sseFailures >= 3) conn.mode = "poll";
  connect();
}

async function poll() {
  clearTimeout(conn.retryTimer);
  try {
    render(await fetchStatus());
    setConn("polling", `live stream unavailable; refreshing every ${POLL_MS / 1000}s`);
  } catch (err) {
    lost();
    return;
  }
  conn.polls += 1;
  if (conn.polls % 12 === 0 && "EventSource" in window) { conn.mode = "sse"; conn.sseFailures = 0; }
  conn.retryTimer = setTimeout(connect, POLL_MS);
}

// -- wiring ---------------------------------------------------------------------------------------
function init() {
  for (const th of document.querySelectorAll("#agent-table th[data-key]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.key;
      view.sortDir = view.sortKey === key ? -view.sortDir : 1;
      view.sortKey = key;
      renderAgents();
    });
  }
  $("#job-detail-close").addEventListener("click", () => {
    view.selectedJob = null;
    $("#job-detail").hidden = true;
    renderJobsView();
  });
  $("#jobs-prev").addEventListener("click", () => turnJobPage(-1));
  $("#jobs-next").addEventListener("click", () => turnJobPage(1));
  for (const [which, ids] of [["agent", ["agents-q", "agents-state"]], ["job", ["jobs-q", "jobs-state", "jobs-kind"]]]) {
    let timer = null;
    $(`#${which}-search`).addEventListener("submit", (e) => e.preventDefault());
    for (const id of ids) {
      $(`#${id}`).addEventListener(id.endsWith("-q") ? "input" : "change", () => {
        clearTimeout(timer);
        timer = setTimeout(() => searchChanged(which), 250);
      });
    }
  }
  $("#agents-prev").addEventListener("click", () => turnAgentPage(-1));
  $("#agents-next").addEventListener("click", () => turnAgentPage(1));
  const redraw = () => { drawChart(); drawHistory(); };
  window.addEventListener("resize", redraw);
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", redraw);
  connect();
}

document.addEventListener("DOMContentLoaded", init);

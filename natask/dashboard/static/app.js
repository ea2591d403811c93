"use strict";
const MAX_TASKS = 200, MAX_FAILED = 100;
const S = {tasks: new Map(), summary: null, replaying: new Set(), skew: 0};
const $ = (id) => document.getElementById(id);

// Every value reaches the page through textContent: task arguments are never parsed as HTML.
// Values come from the wire (events, result records, replies): read each through one of these, so
// an odd type shows as text or a dash instead of stopping the rendering.
const str = (v) => v === undefined || v === null ? "" : typeof v === "string" ? v : String(v);
const arr = (v) => Array.isArray(v) ? v : [];
const fin = (v) => typeof v === "number" && Number.isFinite(v) ? v : null;
function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") e.className = v; else if (k === "data") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(str(c)));
  return e;
}
const td = (text, cls, title) => el("td", {class: cls || "", title: str(title)}, str(text));
const num = (n) => td(n === undefined || n === null ? "–" : str(n), "num");
const badge = (state, prefix) => el("span", {class: "badge state " + (prefix || "s-") + str(state).replace(/\s/g, "_")},
                                    str(state));
const when = (ts) => fin(ts) ? new Date(ts * 1000).toLocaleTimeString() : "";
function ago(ts) {
  if (!fin(ts)) return "";
  const s = Math.max(0, Date.now() / 1000 - S.skew - ts);
  return s < 60 ? `${Math.round(s)}s ago` : s < 3600 ? `${Math.round(s / 60)}m ago` : when(ts);
}
function dur(s) {
  if (fin(s) === null) return "";
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms`;
  if (s < 120) return `${s.toFixed(2)} s`;
  const m = Math.floor(s / 60);
  return m < 120 ? `${m}m ${Math.round(s % 60)}s` : `${Math.floor(m / 60)}h ${m % 60}m`;
}
function uptime(w) {
  if (fin(w.uptime) === null) return "";
  const s = w.uptime + (w.status === "online" ? Math.max(0, Date.now() / 1000 - S.skew - (fin(w.last_seen) ?? 0)) : 0);
  return s < 60 ? `${Math.floor(s)} s` : s < 3600 ? `${Math.floor(s / 60)} min` : s < 172800
    ? `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min` : `${Math.floor(s / 86400)} days`;
}
const activity = (t) => Math.max(fin(t.sent) ?? 0, fin(t.started) ?? 0, fin(t.finished) ?? 0);
function fill(table, rows, empty, cols) {
  $(table).tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {class: "empty"},
    el("td", {colSpan: cols}, empty))]));
}
function toast(text, bad) {
  const t = $("toast");
  t.textContent = text; t.className = "show" + (bad ? " err" : "");
  clearTimeout(toast.timer); toast.timer = setTimeout(() => { t.className = ""; }, 3500);
}

function apply(msg) {
  if (!msg || typeof msg !== "object") return;
  if (msg.full) S.tasks.clear();
  if (fin(msg.now) !== null) S.skew = Date.now() / 1000 - msg.now;
  for (const t of arr(msg.tasks)) if (t && typeof t.id === "string") S.tasks.set(t.id, t);
  if (msg.summary && typeof msg.summary === "object") S.summary = msg.summary;
  if (S.tasks.size > 2 * (MAX_TASKS + MAX_FAILED)) {
    const all = [...S.tasks.values()].sort((a, b) => activity(b) - activity(a));
    const keep = new Set([...all.slice(0, MAX_TASKS), ...all.filter((t) => t.state === "FAILURE").slice(0, MAX_FAILED)]);
    for (const t of all) if (!keep.has(t)) S.tasks.delete(t.id);
  }
  scheduleRender();
}
let pending = false;
function scheduleRender() { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; render(); }); } }

// Each part renders on its own: one that fails (a value of a type nobody expected) leaves the others.
function guarded(part, draw) {
  try { draw(); } catch (e) { console.warn(`dashboard: cannot render ${part}:`, e); }
}

function render() {
  const sum = S.summary;
  if (!sum) return;
  const queues = arr(sum.queues).filter((q) => q && typeof q === "object");
  const workers = arr(sum.workers).filter((w) => w && typeof w === "object");
  const dead = sum.dead_letters && typeof sum.dead_letters === "object" ? sum.dead_letters : {};
  const entries = arr(dead.entries).filter((d) => d && typeof d === "object");
  const deadTotal = fin(dead.total) ?? entries.length;
  const all = [...S.tasks.values()].sort((a, b) => activity(b) - activity(a));
  const failed = all.filter((t) => t.state === "FAILURE").slice(0, MAX_FAILED);
  if (route().page !== "overview") return;
  guarded("the summary", () => {
    $("app").textContent = `${str(sum.app)} · prefix ${str(sum.prefix)}`;
    $("error").textContent = sum.error ? `Cannot read from NATS: ${str(sum.error)}` : "";
    $("error").style.display = sum.error ? "block" : "none";
    $("c-queues").textContent = queues.length;
    $("c-pending").textContent = queues.reduce((n, q) => n + (fin(q.pending) ?? 0), 0);
    $("c-workers").textContent = workers.filter((w) => w.status === "online").length;
    // Every count comes from the server's one tally (summary.counts), never from the rows held here.
    const counts = sum.counts && typeof sum.counts === "object" ? sum.counts : {};
    $("c-seen").textContent = str(fin(counts.seen) ?? fin(sum.seen) ?? "–");
    $("c-succeeded").textContent = str(fin(counts.succeeded) ?? "–");
    $("c-failed").textContent = str(fin(counts.failed) ?? "–");
    $("c-dead").textContent = deadTotal;
    $("card-failed").classList.toggle("bad", (fin(counts.failed) ?? 0) > 0);
    $("card-dead").classList.toggle("bad", deadTotal > 0);
  });

  guarded("the queues", () => fill("queues", queues.map((q) => el("tr", {data: {queue: str(q.name)}},
    td(q.name, "mono", q.consumer ? "" : "no worker has consumed this queue yet"), num(q.pending), num(q.in_flight),
    num(q.redelivered), num((fin(q.in_rate) ?? 0).toFixed(1)), num((fin(q.out_rate) ?? 0).toFixed(1)))),
    "no queues yet", 6));

  guarded("the workers", () => fill("workers", workers.map((w) => el("tr", {data: {worker: str(w.worker)}},
    td(w.worker, "mono", w.hostname ? `${str(w.hostname)} pid ${str(w.pid)}` : ""), el("td", {}, badge(w.status)),
    td(arr(w.queues).map(str).join(", ")), num(`${fin(w.running) ?? 0}/${fin(w.concurrency) ?? "?"}`),
    num(w.succeeded), num(w.failed), num(uptime(w)))), "no worker answered", 7));

  guarded("the tasks", () => {
    const text = $("filter").value.trim().toLowerCase(), state = $("state-filter").value;
    const shown = all.filter((t) => (!state || t.state === state) && (!text ||
      [t.name, t.id, t.args, t.worker, t.queue].some((v) => str(v).toLowerCase().includes(text)))).slice(0, MAX_TASKS);
    $("n-tasks").textContent = `${shown.length}${text || state ? " matching" : ""}`;
    fill("tasks", shown.map((t) => el("tr", {data: {id: str(t.id)}, title: str(t.error)},
      el("td", {}, badge(t.state)), td(t.name, "mono"), idCell(t.id), td(t.queue),
      td(t.args, "mono wrap"), td(t.worker, "muted"), td(ago(fin(t.sent) ?? t.started), "muted", when(t.sent)),
      td(dur(t.runtime), "num"))), "no tasks seen yet", 8);
  });

  guarded("the failed tasks", () => {
    $("n-failed").textContent = String(failed.length);
    fill("failed", failed.map((t) => el("tr", {data: {id: str(t.id)}},
      td(t.name, "mono"), idCell(t.id), td(t.error, "wrap"), td(t.args, "mono wrap"),
      td(t.worker, "muted"), td(ago(t.finished), "muted", when(t.finished)))), "no failures", 6);
  });

  guarded("the dead letters", () => {
    $("n-dead").textContent = deadTotal > entries.length ? `${entries.length} newest of ${deadTotal}`
      : String(deadTotal);
    for (const id of S.replaying) if (!entries.some((d) => d.id === id)) S.replaying.delete(id);
    fill("dlq", entries.map((d) => el("tr", {data: {id: str(d.id)}},
      td(str(d.id).slice(0, 12), "mono", d.id), td(d.task, "mono"), td(d.reason), td(d.error, "wrap"),
      td(d.args, "mono wrap"), num(d.attempts), td(ago(d.time), "muted", when(d.time)),
      el("td", {}, el("button", {class: "replay", disabled: S.replaying.has(d.id), onclick: () => replay(str(d.id))},
        S.replaying.has(d.id) ? "Replaying…" : "Replay")))), "no dead letters", 8);
  });
}

async function replay(id) {
  S.replaying.add(id); render();
  try {
    const r = await fetch(`api/dlq/${encodeURIComponent(id)}/replay`,
                          {method: "POST", headers: {"X-Natask-Dashboard": "1"}});
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || r.statusText);
    toast(`Replayed ${id} to ${body.subject}`);
  } catch (e) {
    S.replaying.delete(id); render();
    toast(`Replay failed: ${e.message}`, true);
  }
}

function live(on, text) { $("live").className = on ? "on" : "off"; $("live-text").textContent = text; }
function connect() {
  if (!window.EventSource) return poll();
  const es = new EventSource("api/events");
  es.onopen = () => live(true, "live");
  es.onmessage = (e) => {
    let msg;
    try { msg = JSON.parse(e.data); } catch (err) { console.warn("dashboard: unreadable message", err); return; }
    apply(msg);
  };
  es.onerror = () => live(false, "reconnecting…");  // EventSource retries by itself
}
async function poll() {
  try { apply(await (await fetch("api/state")).json()); live(true, "polling"); }
  catch (e) { live(false, "unreachable"); }
  setTimeout(poll, 1000);
}




// -- pages (hash routes: every URL stays relative, so the app works mounted under any prefix) ----
const idCell = (id) => el("td", {class: "mono", title: str(id)},
  el("a", {href: `#/task/${encodeURIComponent(str(id))}`}, str(id).slice(0, 12)));
function route() {
  const [, page, arg] = (location.hash || "#/").match(/^#\/([a-z]*)\/?(.*)$/) || [null, "", ""];
  return {page: page === "task" ? "task" : (page || "overview"), arg: decodeURIComponent(arg || "")};
}
async function api(path) {
  const r = await fetch(path, {headers: {"Accept": "application/json"}});
  const body = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) throw new Error(str(body.error) || r.statusText);
  return body;
}
// State changes carry the CSRF header (a cross-site form cannot send it); a body goes as JSON.
async function post(path, payload, method) {
  const headers = {"X-Natask-Dashboard": "1", "Accept": "application/json"};
  if (payload !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {method: method || "POST", headers,
                               body: payload === undefined ? undefined : JSON.stringify(payload)});
  const body = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) throw new Error(str(body.error) || r.statusText);
  return body;
}
function show() {
  const {page, arg} = route();
  for (const p of document.querySelectorAll(".page")) p.classList.toggle("on", p.id === `page-${page}`);
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("on", a.dataset.page === page);
  const load = {tasks: searchPage, task: () => taskPage(arg), workers: workersPage, charts: chartsPage,
                broker: brokerPage, schedules: schedulesPage}[page];
  // data-shown names the route once its page is drawn (what a test of the page waits for).
  const shown = () => { document.body.dataset.shown = location.hash || "#/"; };
  if (load) load().catch((e) => toast(`Cannot load: ${e.message}`, true)).finally(shown);
  else { render(); shown(); }
}

const SEARCH = {offset: 0, limit: 50};
async function searchPage() {
  const form = new FormData($("search"));
  const params = new URLSearchParams();
  for (const [k, v] of form) {
    if (!v) continue;
    params.set(k, (k === "since" || k === "until") ? String(new Date(v).getTime() / 1000) : v);
  }
  params.set("offset", SEARCH.offset); params.set("limit", SEARCH.limit);
  const body = await api(`api/tasks?${params}`);
  const rows = arr(body.tasks);
  fill("search-results", rows.map((t) => el("tr", {data: {id: str(t.id)}}, el("td", {}, badge(t.state)),
    td(t.name, "mono"), idCell(t.id), td(t.queue), td(t.args, "mono wrap"), td(t.worker, "muted"),
    td(when(t.sent), "muted"), td(dur(t.runtime), "num"))), "no matching task", 8);
  const total = fin(body.total) ?? 0;
  $("search-count").textContent = `${total} matching`;
  $("page-info").textContent = total ? `${SEARCH.offset + 1}–${SEARCH.offset + rows.length} of ${total}` : "";
  $("prev").disabled = SEARCH.offset === 0;
  $("next").disabled = SEARCH.offset + rows.length >= total;
  $("history-note").textContent = `${str(body.indexed)} tasks indexed (at most ${str(body.limit_of_index)})` +
    (fin(body.history_from) ? `; history since ${new Date(body.history_from * 1000).toLocaleString()}` : "");
}
$("search").addEventListener("submit", (e) => { e.preventDefault(); SEARCH.offset = 0; searchPage().catch((x) => toast(x.message, true)); });
$("prev").addEventListener("click", () => { SEARCH.offset = Math.max(0, SEARCH.offset - SEARCH.limit); searchPage(); });
$("next").addEventListener("click", () => { SEARCH.offset += SEARCH.limit; searchPage(); });

let shownTask = "";
async function taskPage(id) {
  shownTask = id;
  const t = await api(`api/tasks/${encodeURIComponent(id)}`);
  $("d-id").textContent = str(t.id);
  const fields = [["State", badge(t.state)], ["Task", str(t.name)], ["Queue", str(t.queue)],
    ["Arguments", str(t.args)], ["Worker", str(t.worker)], ["Retries", str(t.retries ?? "")],
    ["Sent", when(t.sent)], ["Started", when(t.started)], ["Finished", when(t.finished)], ["Runtime", dur(t.runtime)],
    ["Error", str(t.error || (t.exc_type ? `${str(t.exc_type)}: ${str(t.message)}` : ""))],
    ["Parent", t.parent_id ? el("a", {href: `#/task/${encodeURIComponent(str(t.parent_id))}`}, str(t.parent_id)) : ""],
    ["Workflow", t.root_id ? el("a", {href: `#/task/${encodeURIComponent(str(t.root_id))}`}, str(t.root_id)) : ""]];
  $("d-fields").replaceChildren(...fields.flatMap(([k, v]) => [el("dt", {}, k),
    el("dd", {data: {field: k.toLowerCase()}}, v)]));
  $("d-result").textContent = t.result === undefined ? "(no result stored)" : str(t.result);
  $("d-traceback").textContent = str(t.traceback) || "(none)";
  fill("d-timeline", arr(t.timeline).map((e) => el("tr", {}, td(when(e.ts) + " " +
    (fin(e.ts) ? new Date(e.ts * 1000).toLocaleDateString() : ""), "muted"), td(e.what), td(e.detail, "wrap"))),
    "nothing recorded", 3);
  const related = [...arr(t.children).map((c) => ["child", c]),
                   ...arr(t.workflow).filter((c) => c.id !== t.id).map((c) => ["workflow", c])];
  fill("d-related", related.map(([rel, c]) => el("tr", {data: {id: str(c.id)}}, td(rel), el("td", {}, badge(c.state)),
    td(c.name, "mono"), idCell(c.id))), "none known", 4);
  const final = ["SUCCESS", "FAILURE", "REVOKED"].includes(str(t.state));
  $("revoke").disabled = final; $("terminate").disabled = final;
}
async function revoke(terminate) {
  const id = shownTask;
  if (!confirm(`${terminate ? "Terminate" : "Revoke"} task ${id}?`)) return;
  try {
    await post(`api/tasks/${encodeURIComponent(id)}/${terminate ? "terminate" : "revoke"}`);
    toast(`${terminate ? "Terminating" : "Revoked"} ${id}`);
    setTimeout(() => route().page === "task" && taskPage(id), 1000);
  } catch (e) { toast(`Revoke failed: ${e.message}`, true); }
}
$("revoke").addEventListener("click", () => revoke(false));
$("terminate").addEventListener("click", () => revoke(true));

async function workersPage() {
  const body = await api("api/workers");
  fill("worker-list", arr(body.workers).map((w) => el("tr", {data: {worker: str(w.worker)}}, td(w.worker, "mono"),
    el("td", {}, badge(w.status)), td(arr(w.queues).map(str).join(", ")), num(w.concurrency), num(w.running),
    num(w.succeeded), num(w.failed), td(arr(w.active).map((a) => a && typeof a === "object"
      ? `${str(a.name || a.task)} ${str(a.id).slice(0, 8)}` : str(a)).join(", "), "mono wrap"),
    td(arr(w.registered).map(str).join(", "), "mono wrap"))),
    "no worker answered", 9);
}

async function chartsPage() {
  const key = $("chart-key").value;
  const [kind, name] = key ? key.split(":", 2) : ["", ""];
  const body = await api(`api/charts?${kind}=${encodeURIComponent(name || "")}`);
  const select = $("chart-key"), keep = select.value;
  select.replaceChildren(el("option", {value: ""}, "all tasks"),
    ...arr(body.tasks).map((t) => el("option", {value: `task:${str(t)}`}, `task ${str(t)}`)),
    ...arr(body.queues).map((q) => el("option", {value: `queue:${str(q)}`}, `queue ${str(q)}`)));
  select.value = keep;
  const pts = arr(body.points);
  bars($("chart-throughput"), pts);
  lines($("chart-latency"), pts);
}
$("chart-key").addEventListener("change", () => chartsPage());
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs) { const e = document.createElementNS(SVG, tag); for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v); return e; }
function bars(root, pts) {
  const max = Math.max(1, ...pts.map((p) => (fin(p.succeeded) ?? 0) + (fin(p.failed) ?? 0)));
  const w = 600 / Math.max(1, pts.length);
  root.replaceChildren(...pts.flatMap((p, i) => {
    const ok = (fin(p.succeeded) ?? 0) / max * 170, bad = (fin(p.failed) ?? 0) / max * 170;
    return [svg("rect", {x: i * w, y: 180 - ok - bad, width: Math.max(1, w - 1), height: ok, fill: "#1d8a4e"}),
            svg("rect", {x: i * w, y: 180 - bad, width: Math.max(1, w - 1), height: bad, fill: "#c93434"})];
  }), svg("text", {x: 4, y: 12, "font-size": 11, fill: "currentColor"}));
  root.lastChild.textContent = `max ${max}/min`;
}
function lines(root, pts) {
  const max = Math.max(0.001, ...pts.flatMap((p) => [fin(p.p50) ?? 0, fin(p.p95) ?? 0]));
  const w = 600 / Math.max(1, pts.length - 1);
  const path = (k) => pts.map((p, i) => fin(p[k]) === null ? null : `${i * w},${180 - p[k] / max * 170}`)
    .filter(Boolean).join(" ");
  root.replaceChildren(svg("polyline", {points: path("p50"), fill: "none", stroke: "#2f6fde", "stroke-width": 2}),
    svg("polyline", {points: path("p95"), fill: "none", stroke: "#c77a12", "stroke-width": 2}),
    svg("text", {x: 4, y: 12, "font-size": 11, fill: "currentColor"}));
  root.lastChild.textContent = `max ${dur(max)}`;
}

// Sizes in binary units, the exact number in the cell's title; a limit of -1 (0 for ages) is none.
const UNITS = ["KiB", "MiB", "GiB", "TiB", "PiB"];
function bytes(n) {
  if (fin(n) === null) return "–";
  if (Math.abs(n) < 1024) return `${n} B`;
  let v = n, unit = "B";
  for (const u of UNITS) { if (Math.abs(v) < 1024) break; v /= 1024; unit = u; }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${unit}`;
}
const exact = (n, unit) => fin(n) === null ? "" : `${n.toLocaleString("en-US")} ${unit}`;
const sizeTd = (n) => td(bytes(n), "num", exact(n, "bytes"));
const unlimited = (n) => fin(n) !== null && n <= 0;
const limitTd = (n, show, unit) => unlimited(n) ? td("unlimited", "num muted", `${str(n)} (no limit)`)
  : td(fin(n) === null ? "–" : show(n), "num", exact(n, unit));
function period(s) {
  const days = +(s / 86400).toFixed(1);
  if (s >= 86400) return `${days} day${days === 1 ? "" : "s"}`;
  if (s >= 3600) return `${+(s / 3600).toFixed(1)} h`;
  return s >= 60 ? `${+(s / 60).toFixed(1)} min` : `${+s.toFixed(3)} s`;
}
const count = (n) => fin(n) === null ? "–" : n.toLocaleString("en-US");

async function brokerPage() {
  const b = await api("api/broker");
  fill("streams", arr(b.streams).map((s) => el("tr", {data: {stream: str(s.name)}}, td(s.name, "mono"), td(s.role, "muted"),
    num(count(s.messages)), sizeTd(s.bytes), num(s.consumers), limitTd(s.max_msgs, count, "messages"),
    limitTd(s.max_bytes, bytes, "bytes"), limitTd(s.max_age, period, "seconds"), num(s.replicas), td(s.storage),
    td(s.discard === "new" ? "refuse new" : s.discard === "old" ? "drop oldest" : s.discard, "", `discard ${str(s.discard)}`))),
    "no stream", 11);
  fill("consumers", arr(b.consumers).map((c) => el("tr", {data: {consumer: str(c.name)}}, td(c.name, "mono"),
    td(c.stream, "mono muted"), num(count(c.pending)), num(count(c.ack_pending)), num(count(c.redelivered)),
    num(count(c.waiting)), num(count(c.delivered)))), "no consumer", 7);
  fill("buckets", arr(b.buckets).map((k) => el("tr", {data: {bucket: str(k.name)}}, td(k.name, "mono"), td(k.role, "muted"),
    num(count(k.values)), sizeTd(k.bytes), limitTd(k.history, count, "values per key"), limitTd(k.ttl, period, "seconds"),
    limitTd(k.max_bytes, bytes, "bytes"), num(k.replicas), td(k.storage))), "no bucket", 9);
  const h = b.history || {};
  $("history-limits").textContent = h.enabled ? `History: stream ${str(h.stream)}, events kept ` +
    `${period(fin(h.max_age) ?? 0)}, at most ${bytes(fin(h.max_bytes) ?? 0)}` : "History: off";
}

// -- schedules: every entry; stored ones edited through app.beat (the server checks every field) --
const ORIGIN = {code: "defined in the app's code (@app.periodic, add_periodic_task): read-only here",
                stored: "stored in the schedules bucket (natask beat add, app.beat.add, this page)"};
let schedulesRead = 0;
async function schedulesPage() {
  const reading = ++schedulesRead;
  const body = await api("api/schedules");
  if (reading !== schedulesRead) return;  // a later reading (after an edit) draws, never an older one
  entryTaskField(arr(body.tasks).map(str));
  fill("schedules", arr(body.entries).filter((e) => e && typeof e === "object").map(entryRow),
    "no periodic entry", 10);
  $("beat-leader").textContent = body.leader ? `Beat leader: ${str(body.leader)}` : "No beat holds the lease.";
}
function entryRow(e) {
  const name = str(e.name), source = str(e.source);
  const state = e.error ? el("span", {class: "badge state s-FAILURE", title: str(e.error)}, "invalid")
    : badge(e.enabled ? "enabled" : "disabled");
  const last = fin(e.last) === null ? "" : e.last_id
    ? el("a", {href: `#/task/${encodeURIComponent(str(e.last_id))}`}, new Date(e.last * 1000).toLocaleString())
    : new Date(e.last * 1000).toLocaleString();
  // A code entry can be switched off and on at run time (as `natask beat disable` does); only a
  // stored one can be removed.
  const actions = el("td", {class: "buttons", title: e.editable === true ? "" : ORIGIN.code},
    ...(e.error ? [] : [el("button", {type: "button", class: e.enabled ? "disable" : "enable",
      onclick: () => editEntry(name, e.enabled ? "disable" : "enable")}, e.enabled ? "Disable" : "Enable")]),
    ...(e.editable === true ? [el("button", {type: "button", class: "remove danger",
      onclick: () => editEntry(name, "remove")}, "Remove")] : []));
  return el("tr", {data: {entry: name, source}}, td(name, "mono"), td(source, "", ORIGIN[source] || ""),
    td(e.task, "mono"), td(e.schedule), td(e.args, "mono wrap"), td(e.queue || "", "muted"),
    el("td", {title: str(e.error)}, state), td(e.next ? new Date(str(e.next)).toLocaleString() : ""),
    el("td", {}, last), actions);
}
async function editEntry(name, verb) {
  if (verb === "remove" && !confirm(`Remove stored entry ${name}? Beats stop firing it.`)) return;
  const path = `api/schedules/${encodeURIComponent(name)}`;
  try {
    await (verb === "remove" ? post(path, undefined, "DELETE") : post(`${path}/${verb}`));
    toast(`${verb === "remove" ? "Removed" : verb === "enable" ? "Enabled" : "Disabled"} ${name}`);
  } catch (x) { toast(`Cannot ${verb} ${name}: ${x.message}`, true); }
  if (route().page === "schedules") await schedulesPage().catch((x) => toast(x.message, true));
}
// The task field: a select of the app's registered tasks; a text field for an app that registers none
// (then any task name may be stored, as with natask beat add).
function entryTaskField(tasks) {
  const holder = $("entry-task"), current = holder.firstChild;
  const key = JSON.stringify(tasks);
  if (current && holder.dataset.tasks === key) return;
  holder.dataset.tasks = key;
  const keep = current ? current.value : "";
  const field = tasks.length ? el("select", {name: "task", required: true},
    ...tasks.map((t) => el("option", {value: t}, t))) : el("input", {name: "task", required: true, placeholder: "task name"});
  if (keep && (!tasks.length || tasks.includes(keep))) field.value = keep;
  holder.replaceChildren(field);
}
function entryKind() {
  const cron = $("entry-form").elements.kind.value === "cron";
  $("entry-when-label").textContent = cron ? "Cron expression" : "Seconds";
  $("entry-form").elements.when.placeholder = cron ? "*/5 * * * *" : "60";
}
$("entry-form").elements.kind.addEventListener("change", entryKind);
$("entry-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const form = $("entry-form"), f = Object.fromEntries(new FormData(form));
  const body = {name: f.name, task: f.task, args: f.args, kwargs: f.kwargs, queue: f.queue, tz: f.tz,
                [f.kind === "cron" ? "cron" : "every"]: f.when};
  $("entry-error").textContent = "";
  try {
    const r = await post("api/schedules", body);
    toast(`Stored ${str(r.added)}: ${str(r.task)} ${str(r.schedule)}`);
    const task = form.elements.task.value;
    form.reset(); form.elements.task.value = task; entryKind();
  } catch (x) { $("entry-error").textContent = x.message; return; }
  await schedulesPage().catch((x) => toast(x.message, true));
});

$("filter").addEventListener("input", render);
$("state-filter").addEventListener("change", render);
window.addEventListener("hashchange", show);
setInterval(() => route().page === "overview" && render(), 5000);  // keep "n s ago" fresh
setInterval(() => {  // next fire times, last ticks and broker sizes change without events
  const page = route().page;
  if (document.visibilityState !== "visible") return;
  if (page === "schedules") schedulesPage().catch(() => {});
  else if (page === "broker") brokerPage().catch(() => {});
}, 5000);
show();
connect();

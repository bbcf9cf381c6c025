// The built-in cost page: reads /costs, edits budgets, and follows /costs/events.
// Plain JavaScript, no build step. The token (when the proxy has COSTS_API_TOKEN) stays in this
// tab's sessionStorage and goes out as an Authorization header; the event stream is read with
// fetch() so that the header goes with it too (EventSource cannot send headers).
"use strict";

const TOKEN_KEY = "llm-cost-proxy.token";
const state = { campaigns: new Map(), open: null, lastEventId: null, stream: null, refresh: null, task: null, days: null };
const $ = (id) => document.getElementById(id);

// -- API ---------------------------------------------------------------------------------------

class AuthNeeded extends Error {}

function headers(extra) {
  const h = Object.assign({}, extra);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

async function api(path, options) {
  const opts = Object.assign({}, options);
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) throw new AuthNeeded();
  const body = await response.json();
  if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
  return body;
}

function showError(error) {
  if (error instanceof AuthNeeded) {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token-form").hidden = false;
    $("campaigns-view").hidden = true;
    $("campaign-view").hidden = true;
    return;
  }
  $("error").textContent = String(error.message || error);
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; }

// -- formatting ----------------------------------------------------------------------------------

// Amounts come as exact decimal strings; shown as they are, cut to at most six decimals.
function usd(text) {
  const [whole, fraction = ""] = String(text).split(".");
  let digits = fraction.slice(0, 6).replace(/0+$/, "");
  if (digits.length < 2) digits = digits.padEnd(2, "0");
  return "$" + whole + "." + digits;
}
const count = (n) => Number(n).toLocaleString("en-US");
function when(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}
function share(spent, limit) {
  const s = Number(spent), l = Number(limit);
  if (!(l > 0)) return s > 0 ? 100 : 0;
  return Math.min(100, (s / l) * 100);
}
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

// -- campaigns list ------------------------------------------------------------------------------

async function loadCampaigns() {
  const all = [];
  let cursor = null;
  do {
    const page = await api("/costs/campaigns?limit=500" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
    all.push(...page.campaigns);
    cursor = page.next_cursor;
  } while (cursor && all.length < 5000);
  state.campaigns = new Map(all.map((c) => [c.campaign_id, c]));
  renderCampaigns();
}

function renderCampaigns() {
  const body = $("campaigns").tBodies[0];
  body.replaceChildren();
  const rows = [...state.campaigns.values()].sort((a, b) => (b.last_seen || "").localeCompare(a.last_seen || ""));
  $("no-campaigns").hidden = rows.length > 0;
  for (const c of rows) body.append(campaignRow(c));
}

function campaignRow(c) {
  const b = c.budget;
  const bar = el("div", { "data-status": b.status });
  bar.style.width = share(b.spent_usd, b.limit_usd) + "%";
  const row = el("tr", { class: "link", "data-campaign": c.campaign_id },
    el("td", { "data-label": "Campaign" }, el("a", { href: "#/c/" + encodeURIComponent(c.campaign_id), text: c.campaign_id })),
    el("td", { class: "spend", "data-label": "Spent" },
      el("span", { class: "text", text: usd(b.spent_usd) + " of " + usd(b.limit_usd) }),
      el("div", { class: "mini" }, bar)),
    el("td", { "data-label": "Status" }, el("span", { class: "badge", "data-status": b.status, text: b.status })),
    el("td", { class: "num", "data-label": "Requests", text: count(c.requests) }),
    el("td", { "data-label": "Last call", text: when(c.last_seen) }));
  row.addEventListener("click", (e) => {
    if (e.target.tagName !== "A") location.hash = "#/c/" + encodeURIComponent(c.campaign_id);
  });
  return row;
}

// -- one campaign --------------------------------------------------------------------------------

function isoDay(d) { return d.toISOString().slice(0, 10); }

async function loadCampaign(id) {
  const path = "/costs/campaigns/" + encodeURIComponent(id);
  const to = new Date();
  const from = new Date(to.getTime() - 29 * 86400000);
  const [campaign, sessions, daily] = await Promise.all([
    api(path),
    api(path + "/sessions?include_deleted=true"),
    api(path + "/daily?from=" + isoDay(from) + "&to=" + isoDay(to)),
  ]);
  if (state.open !== id) return;
  state.campaigns.set(id, campaign);
  renderCampaign(campaign);
  renderSessions(sessions.sessions, sessions.has_more);
  renderChart(daily.days);
}

function renderCampaign(c) {
  const b = c.budget;
  $("c-title").textContent = c.campaign_id;
  $("c-spent").textContent = usd(c.cost_usd);
  $("c-limit").textContent = usd(b.limit_usd);
  $("c-remaining").textContent = usd(b.remaining_usd);
  $("c-status").textContent = b.status;
  $("c-status").dataset.status = b.status;
  $("c-requests").textContent = count(c.requests);
  $("c-sessions").textContent = count(c.session_count) +
    (c.deleted_session_count ? " (" + count(c.deleted_session_count) + " deleted)" : "");
  $("c-meter").style.width = share(b.spent_usd, b.limit_usd) + "%";
  $("c-meter").dataset.status = b.status;
  $("c-warning-mark").style.left = share(b.warning_usd, b.limit_usd) + "%";
  for (const node of $("c-tokens").querySelectorAll("[data-kind]")) {
    node.textContent = count(c.tokens[node.dataset.kind] || 0);
  }
  const form = $("budget-form");
  if (!form.contains(document.activeElement)) {
    $("warning").value = b.warning_usd;
    $("limit").value = b.limit_usd;
  }
  $("budget-source").textContent = b.source === "override"
    ? "This campaign has its own budget." : "This campaign uses the proxy's default budget.";
}

function renderSessions(sessions, more) {
  const body = $("sessions").tBodies[0];
  body.replaceChildren();
  for (const s of sessions) {
    const name = el("td", { "data-label": "Session" }, s.session_id);
    if (s.deleted_at) name.append(el("span", { class: "tag", title: "deleted " + when(s.deleted_at), text: "deleted" }));
    body.append(el("tr", { class: s.deleted_at ? "deleted" : "", "data-session": s.session_id }, name,
      el("td", { class: "num", "data-label": "Cost", text: usd(s.cost_usd) }),
      el("td", { class: "num", "data-label": "Requests", text: count(s.requests) }),
      el("td", { class: "num", "data-label": "Tokens", text: count(s.tokens.input) + " / " + count(s.tokens.output) }),
      el("td", { "data-label": "Last call", text: when(s.last_seen) })));
  }
  if (!sessions.length) body.append(el("tr", {}, el("td", { colspan: "5", class: "muted", text: "No sessions yet." })));
  if (more) body.append(el("tr", {}, el("td", { colspan: "5", class: "muted",
    text: "The " + count(sessions.length) + " most recent sessions; the campaign's totals above count them all." })));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

// Hand-drawn SVG bars: one per day, the y axis from zero to the largest day. Drawn at the
// container's own width in pixels, so labels keep their size on a phone and on a wide screen.
function renderChart(days) {
  state.days = days;
  const W = Math.max(280, $("chart").clientWidth || 600), H = W < 500 ? 170 : 210;
  const left = 58, bottom = 22, top = 10, right = 6;
  const max = Math.max(0, ...days.map((d) => Number(d.cost_usd)));
  const plotW = W - left - right, plotH = H - top - bottom;
  const step = plotW / Math.max(days.length, 1);
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "xMidYMid meet" });
  root.append(svg("line", { class: "axis", x1: left, y1: top + plotH, x2: W - right, y2: top + plotH }));
  for (const f of [0, 0.5, 1]) {
    const y = top + plotH - f * plotH;
    root.append(svg("line", { class: "axis", x1: left, y1: y, x2: W - right, y2: y, "stroke-dasharray": "2 3" }));
    root.append(svg("text", { x: left - 4, y: y + 3, "text-anchor": "end" }, usd(axisAmount(max * f, max))));
  }
  days.forEach((d, i) => {
    const v = Number(d.cost_usd);
    const h = max > 0 ? Math.max(v > 0 ? 1.5 : 0, (v / max) * plotH) : 0;
    const x = left + i * step + step * 0.15;
    const bar = svg("rect", { class: "day", x, y: top + plotH - h, width: step * 0.7, height: h, "data-date": d.date, "data-cost": d.cost_usd });
    bar.append(svg("title", {}, `${d.date}: ${usd(d.cost_usd)}, ${count(d.requests)} requests`));
    root.append(bar);
    if ((days.length - 1 - i) % (W < 500 ? 10 : 7) === 0) {
      const last = i === days.length - 1;
      root.append(svg("text", { x: last ? W - right : x + step * 0.35, y: H - 6,
        "text-anchor": last ? "end" : "middle" }, d.date.slice(5)));
    }
  });
  $("chart").replaceChildren(root);
}

// -- budget editing ------------------------------------------------------------------------------

async function saveBudget(event) {
  event.preventDefault();
  const id = state.open;
  try {
    const c = await api("/costs/campaigns/" + encodeURIComponent(id) + "/budget", {
      method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ warning_usd: $("warning").value.trim(), limit_usd: $("limit").value.trim() }),
    });
    document.activeElement.blur();
    clearError();
    state.campaigns.set(id, c);
    renderCampaign(c);
    $("budget-saved").textContent = "Saved.";
  } catch (e) { showError(e); }
}

async function resetBudget() {
  const id = state.open;
  try {
    const c = await api("/costs/campaigns/" + encodeURIComponent(id) + "/budget", { method: "DELETE" });
    clearError();
    state.campaigns.set(id, c);
    renderCampaign(c);
    $("budget-saved").textContent = "Back to the defaults.";
  } catch (e) { showError(e); }
}

// -- live updates --------------------------------------------------------------------------------

function setLive(on) {
  $("live").dataset.state = on ? "on" : "off";
  $("live").textContent = on ? "live" : "offline";
}

async function follow() {
  const h = headers({ Accept: "text/event-stream" });
  if (state.lastEventId) h["Last-Event-ID"] = state.lastEventId;
  const controller = new AbortController();
  state.stream = controller;
  try {
    const response = await fetch("/costs/events", { headers: h, signal: controller.signal, cache: "no-store" });
    if (response.status === 401) throw new AuthNeeded();
    if (!response.ok || !response.body) throw new Error("event stream: HTTP " + response.status);
    setLive(true);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        handleBlock(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
      }
    }
  } catch (e) {
    if (e instanceof AuthNeeded) { showError(e); return; }
    if (controller.signal.aborted) return;
  } finally {
    setLive(false);
  }
  if (state.stream === controller) setTimeout(follow, 2000);
}

function handleBlock(block) {
  let id = null, name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value; else if (field === "event") name = value; else if (field === "data") data.push(value);
  }
  if (id) state.lastEventId = id;
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (name === "usage") onUsage(payload);
  else if (name === "budget") onBudget(payload);
  else if (name === "resync") refreshAll();
}

function onUsage(u) {
  const known = state.campaigns.get(u.campaign_id);
  if (known) {
    known.cost_usd = u.campaign_cost_usd;
    known.requests += 1;
    known.last_seen = u.at;
    Object.assign(known.budget, { spent_usd: u.campaign_cost_usd, status: u.budget_status });
    const remaining = Number(known.budget.limit_usd) - Number(u.campaign_cost_usd);
    known.budget.remaining_usd = String(Math.max(0, remaining).toFixed(10));
    renderCampaigns();
  } else {
    schedule(loadCampaigns);
  }
  if (state.open === u.campaign_id) schedule(() => loadCampaign(u.campaign_id));
  const line = el("li", { "data-campaign": u.campaign_id },
    `${when(u.at)} · ${u.campaign_id} / ${u.session_id} · ${u.model || "?"} · ${usd(u.cost_usd)}` +
    (u.estimated ? " (estimated)" : "") + ` · campaign ${usd(u.campaign_cost_usd)}`);
  $("events").prepend(line);
  while ($("events").children.length > 30) $("events").lastChild.remove();
}

function onBudget(b) {
  const known = state.campaigns.get(b.campaign_id);
  if (known) {
    Object.assign(known.budget, b);
    delete known.budget.campaign_id;
    renderCampaigns();
  }
  if (state.open === b.campaign_id) schedule(() => loadCampaign(b.campaign_id));
}

// An axis label with as many decimals as the chart's largest day needs (a day of $0.000043 must
// not make every line "$0.00").
function axisAmount(value, max) {
  const decimals = max > 0 ? Math.min(10, Math.max(2, 2 - Math.floor(Math.log10(max)))) : 2;
  return value.toFixed(decimals);
}

// Bursts of events cause one reload, not one per event: at most one every 250 ms, however
// steady the traffic (a timer restarted by every event would never fire while calls go on).
function schedule(task) {
  state.task = task;
  if (state.refresh) return;
  state.refresh = setTimeout(() => {
    state.refresh = null;
    state.task().catch(showError);
  }, 250);
}

// -- navigation ----------------------------------------------------------------------------------

async function route() {
  const match = location.hash.match(/^#\/c\/(.+)$/);
  state.open = match ? decodeURIComponent(match[1]) : null;
  $("campaign-view").hidden = !state.open;
  $("campaigns-view").hidden = !!state.open;
  $("budget-saved").textContent = "";
  try {
    if (state.open) await loadCampaign(state.open); else await loadCampaigns();
    clearError();
  } catch (e) { showError(e); }
}

async function refreshAll() {
  try {
    await loadCampaigns();
    if (state.open) await loadCampaign(state.open);
  } catch (e) { showError(e); }
}

function start() {
  $("token-form").hidden = true;
  route().then(() => { if (!state.stream) follow(); });
}

document.addEventListener("DOMContentLoaded", () => {
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    $("campaigns-view").hidden = false;
    state.stream = null;
    start();
  });
  $("budget-form").addEventListener("submit", saveBudget);
  $("reset-budget").addEventListener("click", resetBudget);
  window.addEventListener("hashchange", route);
  let resizing = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizing);
    resizing = setTimeout(() => { if (state.days && state.open) renderChart(state.days); }, 150);
  });
  start();
});

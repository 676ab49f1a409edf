// The credits history page: reads the JSON/CSV API of the service that served it and
// draws the chart as plain SVG. Every value from the API or the URL is written as
// text (textContent, attributes), never as markup.
"use strict";

var RANGES = [
  { key: "7d", label: "7 days", days: 7, step: "1h" },
  { key: "30d", label: "30 days", days: 30, step: "1d" },
  { key: "1y", label: "1 year", days: 365, step: "1d" },
  { key: "all", label: "All", days: null, step: "1w" }
];
var DEFAULT_RANGE = "30d";
var SVG_NS = "http://www.w3.org/2000/svg";

var marker = "/credits_history/";
var path = location.pathname;
var base = path.slice(0, path.lastIndexOf(marker));
var encodedProject = path.slice(path.lastIndexOf(marker) + marker.length);
var project = decodeURIComponent(encodedProject);
var projectUrl = base + "/api/projects/" + encodeURIComponent(project);

function el(tag, text, attrs) {
  var node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (var name in attrs || {}) node.setAttribute(name, attrs[name]);
  return node;
}

function svg(tag, attrs, text) {
  var node = document.createElementNS(SVG_NS, tag);
  for (var name in attrs) node.setAttribute(name, String(attrs[name]));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function setState(state, message) {
  document.body.setAttribute("data-state", state);
  document.body.classList.toggle("error", state === "unknown" || state === "error");
  document.getElementById("message").textContent = message || "";
}

function currentRange() {
  var wanted = new URLSearchParams(location.search).get("range");
  return RANGES.find(function (r) { return r.key === wanted; }) ||
    RANGES.find(function (r) { return r.key === DEFAULT_RANGE; });
}

// `%Y-%m-%d %H:%M:%S` in UTC, as the API takes and gives dates.
function apiDate(date) {
  return date.toISOString().slice(0, 19).replace("T", " ");
}

function parseApiDate(text) {
  return new Date(text.replace(" ", "T") + "Z");
}

function historyUrl(range) {
  var query = new URLSearchParams({ format: "csv", step: range.step });
  if (range.days !== null) {
    query.set("start_date", apiDate(new Date(Date.now() - range.days * 86400000)));
  }
  return base + "/api/credits_history/" + encodeURIComponent(project) + "?" + query.toString();
}

// RFC 4180 rows (quoted fields may hold commas, quotes and line breaks).
function parseCsv(text) {
  var rows = [], row = [], field = "", quoted = false;
  for (var i = 0; i < text.length; i++) {
    var c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i++; }
      else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { row.push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(field); rows.push(row); row = []; field = "";
    } else field += c;
  }
  if (field !== "" || row.length) { row.push(field); rows.push(row); }
  var header = rows.shift() || [];
  return rows.filter(function (r) { return r.length === header.length; }).map(function (r) {
    var out = {};
    header.forEach(function (name, k) { out[name] = r[k]; });
    return out;
  });
}

// One point per timestamp: the project's totals after the bucket.
function toPoints(rows) {
  var byTime = new Map();
  rows.forEach(function (row) {
    var used = Number(row.used_after), granted = Number(row.granted_after);
    var seen = byTime.get(row.timestamp);
    if (!seen || used > seen.used) {
      byTime.set(row.timestamp, { time: parseApiDate(row.timestamp), used: used, granted: granted });
    }
  });
  return Array.from(byTime.values()).sort(function (a, b) { return a.time - b.time; });
}

// Buckets start at their aligned boundary (weeks on Mondays), which may lie before
// the project existed: draw none earlier than the project's creation.
function clipToStart(points, createdAt) {
  var start = createdAt ? new Date(createdAt) : null;
  if (!start || isNaN(start.getTime())) return points;
  points.forEach(function (p) { if (p.time < start) p.time = start; });
  return points;
}

function breakdown(rows) {
  var sums = new Map();
  rows.forEach(function (row) {
    sums.set(row.metric, (sums.get(row.metric) || 0) + Number(row.credits));
  });
  return Array.from(sums.entries()).sort(function (a, b) { return b[1] - a[1]; });
}

function fmt(n) {
  return Number(n).toLocaleString("en", { maximumFractionDigits: 2, minimumFractionDigits: 2 });
}

function fmtDate(date) {
  return apiDate(date).slice(0, 16) + " UTC";
}

function renderChart(points, range) {
  var W = 900, H = 320, L = 70, R = 20, T = 15, B = 35;
  var root = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img", "data-points": points.length });
  root.appendChild(svg("title", {}, "Used, remaining and granted credits"));
  var now = Date.now();
  var t0 = range.days !== null ? now - range.days * 86400000
    : (points.length ? points[0].time.getTime() : now - 86400000);
  var t1 = Math.max(now, t0 + 1);
  var top = 1;
  points.forEach(function (p) { top = Math.max(top, p.used, p.granted, p.granted - p.used); });
  top *= 1.05;
  var bottom = Math.min(0, Math.min.apply(null, points.map(function (p) { return p.granted - p.used; }).concat([0])));
  var x = function (t) { return L + (t - t0) / (t1 - t0) * (W - L - R); };
  var y = function (v) { return T + (top - v) / (top - bottom) * (H - T - B); };

  root.appendChild(svg("line", { "class": "axis", x1: L, x2: W - R, y1: y(0), y2: y(0) }));
  root.appendChild(svg("line", { "class": "axis", x1: L, x2: L, y1: T, y2: H - B }));
  [bottom, (top + bottom) / 2, top].forEach(function (v) {
    root.appendChild(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, fmt(v)));
  });
  root.appendChild(svg("text", { x: L, y: H - 12 }, fmtDate(new Date(t0))));
  root.appendChild(svg("text", { x: W - R, y: H - 12, "text-anchor": "end" }, fmtDate(new Date(t1))));
  if (!points.length) {
    root.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "No usage in this range"));
    return root;
  }

  var line = function (value, stepped) {
    return points.map(function (p, i) {
      var px = x(p.time.getTime()).toFixed(1), py = y(value(p)).toFixed(1);
      if (i === 0) return "M" + px + " " + py;
      return (stepped ? "H" + px + " V" + py : "L" + px + " " + py);
    }).join(" ") + (stepped ? " H" + x(t1).toFixed(1) : "");
  };
  root.appendChild(svg("path", { "class": "grant", d: line(function (p) { return p.granted; }, true) }));
  root.appendChild(svg("path", { "class": "remaining", d: line(function (p) { return p.granted - p.used; }) }));
  root.appendChild(svg("path", { "class": "used", d: line(function (p) { return p.used; }) }));
  points.forEach(function (p) {
    var cx = x(p.time.getTime()).toFixed(1);
    var used = svg("circle", { "class": "point", cx: cx, cy: y(p.used).toFixed(1), r: 3.5 });
    used.appendChild(svg("title", {}, fmtDate(p.time) + ": used " + fmt(p.used) + " of " + fmt(p.granted)));
    root.appendChild(used);
    root.appendChild(svg("circle", { "class": "point-remaining", cx: cx, cy: y(p.granted - p.used).toFixed(1), r: 2.5 }));
  });
  return root;
}

function renderSummary(detail) {
  var box = document.getElementById("summary");
  box.replaceChildren();
  var item = function (label, value) {
    var div = el("div");
    div.appendChild(el("span", label));
    div.appendChild(el("b", value));
    box.appendChild(div);
  };
  item("granted", detail.granted_credits);
  item("used", detail.used_credits);
  item("remaining", detail.remaining_credits);
  item("burn rate (last " + burnBasis(detail) + ")", detail.burn_rate_per_hour + " / h");
  item("forecast run-out", detail.forecast_run_out_at ? fmtDate(new Date(detail.forecast_run_out_at)) : "none");
  if (detail.held_credits && Number(detail.held_credits) !== 0) item("held for review", detail.held_credits);
  renderHeld(detail.held_charges || []);
}

// The time the burn rate covers: the window, or less for a young project.
function burnBasis(detail) {
  var hours = detail.burn_rate_window_hours;
  if (!detail.burn_rate_since) return hours + " h";
  var minutes = Math.round((Date.now() - new Date(detail.burn_rate_since).getTime()) / 60000);
  if (minutes >= hours * 60 - 1) return hours + " h";
  return minutes >= 120 ? Math.round(minutes / 60) + " h" : Math.max(minutes, 1) + " min";
}

// Charges the jump guard held (not in used credits until an operator approves them).
function renderHeld(held) {
  var box = document.getElementById("held");
  if (!box) return;
  box.replaceChildren();
  box.hidden = !held.length;
  if (!held.length) return;
  box.appendChild(el("h2", "Charges held for review"));
  var table = el("table");
  var head = el("tr");
  ["step", "metric", "quantity", "credits", "status", "reason"].forEach(function (h) { head.appendChild(el("th", h)); });
  table.appendChild(head);
  held.forEach(function (h) {
    var tr = el("tr", null, { "class": "held", "data-status": h.status });
    tr.appendChild(el("td", fmtDate(new Date(h.from)) + " – " + fmtDate(new Date(h.to))));
    tr.appendChild(el("td", h.metric));
    tr.appendChild(el("td", h.quantity, { "class": "num" }));
    tr.appendChild(el("td", h.credits, { "class": "num" }));
    tr.appendChild(el("td", h.status));
    tr.appendChild(el("td", h.status === "held" ? h.reason : (h.decision_reason || "") + (h.decided_by ? " (" + h.decided_by + ")" : "")));
    table.appendChild(tr);
  });
  box.appendChild(table);
}

function renderBreakdown(rows) {
  var box = document.getElementById("breakdown");
  box.replaceChildren();
  var sums = breakdown(rows);
  if (!sums.length) { box.appendChild(el("p", "No usage in this range.")); return; }
  var table = el("table");
  var head = el("tr");
  head.appendChild(el("th", "metric"));
  head.appendChild(el("th", "credits"));
  table.appendChild(head);
  sums.forEach(function (entry) {
    var tr = el("tr", null, { "class": "metric" });
    tr.appendChild(el("td", entry[0]));
    tr.appendChild(el("td", fmt(entry[1]), { "class": "num" }));
    table.appendChild(tr);
  });
  box.appendChild(table);
}

function renderNotifications(list) {
  var box = document.getElementById("notifications");
  box.replaceChildren();
  if (!list.length) { box.appendChild(el("p", "None.")); return; }
  var ul = el("ul");
  list.slice(0, 10).forEach(function (n) {
    ul.appendChild(el("li", fmtDate(new Date(n.crossed_at)) + ": " + n.limit_type + " (" +
      n.percent_used + " % of " + n.granted_credits + " used, by " + n.cause + ")", { "class": "notification" }));
  });
  box.appendChild(ul);
}

function renderRanges(active) {
  var box = document.getElementById("ranges");
  box.replaceChildren();
  RANGES.forEach(function (range) {
    var button = el("button", range.label, { type: "button", "data-range": range.key,
      "aria-pressed": String(range.key === active.key) });
    button.addEventListener("click", function () {
      var url = new URL(location.href);
      url.searchParams.set("range", range.key);
      history.replaceState(null, "", url);
      load();
    });
    box.appendChild(button);
  });
}

async function getJson(url) {
  var response = await fetch(url, { headers: { Accept: "application/json" } });
  return { status: response.status, body: response.ok ? await response.json() : null };
}

var generation = 0;

async function load() {
  var mine = ++generation;
  var range = currentRange();
  document.getElementById("title").textContent = "Credits history of " + project;
  document.title = "Credits history: " + project;
  setState("loading", "Loading…");
  try {
    var detail = await getJson(projectUrl);
    if (detail.status === 404) {
      document.getElementById("content").hidden = true;
      setState("unknown", "Unknown project “" + project + "”: this service bills no project of that name.");
      return;
    }
    if (!detail.body) throw new Error("project details answered " + detail.status);
    var csvUrl = historyUrl(range);
    var results = await Promise.all([
      fetch(csvUrl, { headers: { Accept: "text/csv" } }),
      getJson(projectUrl + "/notifications")
    ]);
    if (mine !== generation) return;
    var rows = [];
    if (results[0].ok) rows = parseCsv(await results[0].text());
    else if (results[0].status !== 404) throw new Error("history answered " + results[0].status);
    renderSummary(detail.body);
    renderRanges(range);
    var link = document.getElementById("csv");
    link.href = csvUrl;
    link.setAttribute("download", project + "-" + range.key + ".csv");
    var chart = document.getElementById("chart");
    chart.replaceChildren(renderChart(clipToStart(toPoints(rows), detail.body.created_at), range));
    renderBreakdown(rows);
    renderNotifications(results[1].body || []);
    document.getElementById("content").hidden = false;
    setState("ready", rows.length ? "" : "No usage in this range.");
  } catch (err) {
    if (mine === generation) setState("error", "Could not load the history: " + err.message);
  }
}

load();

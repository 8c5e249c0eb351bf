// The zroute dashboard: reads the events of stats/stream and draws them. Every text a
// peer chose (worker ids, services, gateway names) goes in as textContent, never as HTML.
"use strict";
(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const RETRY_MS = 3000; // after the feed refused us (503) or the gateway went away
  const MAX_EVENTS = 100;
  const MIN_SPAN_S = 60; // of a chart's time axis
  const STATE_TEXT = { ready: "ready", draining: "draining", evicted: "gone (evicted)" };
  const CHARTS = [
    { id: "chart-rate", unit: "/s", min: 1, series: [
      { key: "requests_per_s", label: "requests/s", color: "#2f6fdb" },
      { key: "errors_per_s", label: "errors/s", color: "#c4302b" }] },
    { id: "chart-latency", unit: "s", min: 0.01, series: [
      { key: "latency_p50_s", label: "p50", color: "#1f8f4e" },
      { key: "latency_p99_s", label: "p99", color: "#c27c00" }] },
    { id: "chart-queue", unit: "", min: 1, series: [
      { key: "queue_depth", label: "queued", color: "#8a4fd1" },
      { key: "inflight", label: "in flight", color: "#2f6fdb" }] },
  ];

  const $ = (id) => document.getElementById(id);
  let points = [];
  let intervalS = 1;
  let windowS = 300;
  let lastEvent = 0; // Date.now() of the last event of any kind
  let states = null; // worker id -> state, as last shown
  let brokerDown = false;

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  function svgEl(tag, attributes) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    return node;
  }

  function seconds(value) {
    if (value === null || value === undefined) return "–";
    if (value >= 1) return value.toFixed(2) + " s";
    const ms = value * 1000;
    return (ms >= 100 ? ms.toFixed(0) : ms >= 10 ? ms.toFixed(1) : +ms.toFixed(2)) + " ms";
  }

  function number(value, unit) {
    if (unit === "s") return seconds(value);
    const text = value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1)
      : +value.toFixed(2) + "";
    return text + unit;
  }

  function duration(s) {
    const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    return m ? `${m}m ${Math.floor(s % 60)}s` : `${Math.floor(s)}s`;
  }

  function setStatus(kind, text) {
    const status = $("status");
    status.className = "status " + kind;
    status.textContent = text;
  }

  function showBanner(text) {
    const banner = $("banner");
    banner.hidden = !text;
    banner.textContent = text || "";
    document.body.classList.toggle("stale", !!text);
  }

  function logEvent(text, kind) {
    const item = el("li", undefined, kind);
    item.append(el("time", new Date().toLocaleTimeString()), text);
    const list = $("events");
    list.prepend(item);
    while (list.children.length > MAX_EVENTS) list.lastChild.remove();
  }

  // --- totals ---------------------------------------------------------------------

  function renderTotals(broker, brokers) {
    const totals = [
      ["requests", broker.requests], ["completed", broker.completed],
      ["failed", broker.failed], ["errors answered", broker.errors],
      ["in flight", broker.inflight], ["queue depth", broker.queue_depth],
      ["retries", broker.retries], ["timeouts", broker.timeouts],
      ["cancelled", broker.cancelled], ["evictions", broker.evictions],
      ["workers ready", broker.workers_ready], ["workers live", broker.workers_live],
    ];
    if (brokers.length > 1) totals.push(["refused over capacity", broker.refusals]);
    const cells = totals.map(([label, value]) => {
      const cell = el("div", undefined, "total");
      cell.append(el("b", String(value)), el("span", label));
      return cell;
    });
    $("totals").replaceChildren(...cells);
    $("broker").textContent = brokers.length > 1 ? brokersLine(brokers)
      : `broker up ${duration(broker.uptime_s)}, boot ${broker.boot_id}`;
  }

  // Several brokers: how many answer, each one's uptime, and which do not answer.
  function brokersLine(brokers) {
    const up = brokers.filter((b) => b.reachable);
    const each = brokers.map((b) => b.reachable ? `${b.endpoint} up ${duration(b.uptime_s)}`
      : `${b.endpoint} unreachable`);
    return `${up.length} of ${brokers.length} brokers answer: ${each.join(", ")}`;
  }

  // --- workers --------------------------------------------------------------------

  function loadCell(worker, busiest) {
    const unlimited = !worker.capacity;
    const share = unlimited ? worker.inflight / Math.max(busiest, 1)
      : worker.inflight / worker.capacity;
    const bar = el("div", undefined,
      "bar" + (unlimited ? " unlimited" : share >= 1 ? " full" : ""));
    const fill = el("div");
    fill.style.width = Math.min(100, share * 100).toFixed(1) + "%";
    bar.append(fill);
    const cell = el("td");
    const load = el("div", undefined, "load");
    load.append(bar, `${worker.inflight} / ${unlimited ? "∞" : worker.capacity}`);
    cell.append(load);
    return cell;
  }

  function workerRow(worker, busiest, changed) {
    const gone = worker.state === "evicted";
    const row = el("tr", undefined, (gone ? "gone" : "") + (changed ? " changed" : ""));
    row.dataset.worker = worker.id;
    row.dataset.state = worker.state;
    row.append(
      el("td", worker.id),
      el("td", worker.services.join(", ")),
      el("td", STATE_TEXT[worker.state] || worker.state, "state " + worker.state),
      loadCell(worker, busiest),
      el("td", String(worker.completed), "num"),
      el("td", String(worker.failed), "num"),
      el("td", seconds(worker.latency_p50_s), "num"),
      el("td", seconds(worker.latency_p99_s), "num"),
      el("td", gone ? "–" : `${worker.last_seen_s.toFixed(1)} s ago`, "num"));
    return row;
  }

  function renderWorkers(stats) {
    const workers = stats.workers;
    const busiest = Math.max(0, ...workers.map((w) => w.inflight));
    const previous = states;
    states = new Map(workers.map((w) => [w.id, w.state]));
    const rows = workers.map((worker) => {
      const before = previous && previous.get(worker.id);
      const changed = previous !== null && before !== worker.state;
      if (changed) noteChange(worker, before);
      return workerRow(worker, busiest, changed && before !== undefined);
    });
    $("workers").tBodies[0].replaceChildren(...rows);
    const b = stats.broker;
    $("workers-note").textContent = `${b.workers_ready} ready, ${b.workers_live} live, ` +
      `${b.workers_departed} gone` + (b.workers_truncated ? " (list truncated)" : "");
  }

  function noteChange(worker, before) {
    if (worker.state === "evicted") logEvent(`${worker.id} is gone (evicted)`, "bad");
    else if (worker.state === "draining") logEvent(`${worker.id} is draining`, "warn");
    else logEvent(`${worker.id} ${before ? "is ready again" : "registered"}`, "ok");
  }

  // --- gateways -------------------------------------------------------------------

  function renderGateways(gateways) {
    const rows = Object.entries(gateways).map(([name, g]) => {
      const errors = Object.entries(g.requests_by_status)
        .filter(([status]) => Number(status) >= 500).reduce((sum, [, count]) => sum + count, 0);
      const row = el("tr");
      row.append(el("td", name), el("td", String(g.requests), "num"),
        el("td", String(g.inflight), "num"), el("td", String(errors), "num"),
        el("td", String(g.incomplete), "num"), el("td", String(g.disconnects), "num"));
      return row;
    });
    $("gateways").tBodies[0].replaceChildren(...rows);
  }

  // --- charts ---------------------------------------------------------------------

  function niceMax(value, floor) {
    const top = Math.max(value * 1.15, floor);
    const step = Math.pow(10, Math.floor(Math.log10(top)));
    for (const multiple of [1, 2, 2.5, 5, 10]) if (multiple * step >= top) return multiple * step;
    return top;
  }

  // Lines from points; a gap (missing value, or no point for 2.5 intervals) breaks them.
  function pathOf(key, x, y) {
    let d = "", lastT = null;
    for (const point of points) {
      const value = point[key];
      if (value === null || value === undefined) { lastT = null; continue; }
      const joined = lastT !== null && point.t - lastT <= 2.5 * intervalS;
      d += `${joined ? "L" : "M"}${x(point.t).toFixed(1)},${y(value).toFixed(1)}`;
      lastT = point.t;
    }
    return d;
  }

  function drawChart(chart) {
    const svg = $(chart.id);
    const width = svg.clientWidth || 400, height = svg.clientHeight || 170;
    const left = 56, right = 8, top = 20, bottom = 18;
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    // The last windowS seconds; while there are fewer, at least a minute of them.
    const end = points.length ? points[points.length - 1].t : Date.now() / 1000;
    const first = points.length ? points[0].t : end;
    const span = Math.min(windowS, Math.max(MIN_SPAN_S, end - first));
    const start = end - span;
    const visible = points.filter((p) => p.t >= start);
    const highest = Math.max(0, ...visible.flatMap((p) => chart.series.map((s) => p[s.key] || 0)));
    const yMax = niceMax(highest, chart.min);
    const x = (t) => left + (t - start) / span * (width - left - right);
    const y = (v) => height - bottom - v / yMax * (height - top - bottom);
    const nodes = [];
    for (const fraction of [0, 0.5, 1]) {
      const v = yMax * fraction;
      nodes.push(svgEl("line", { class: "grid", x1: left, x2: width - right, y1: y(v), y2: y(v) }));
      const label = svgEl("text", { x: left - 4, y: y(v) + 4, "text-anchor": "end" });
      label.textContent = number(v, chart.unit);
      nodes.push(label);
    }
    [[start, "-" + Math.round(span / 60) + " min", "start"], [end, "now", "end"]]
      .forEach(([t, text, anchor]) => {
        const label = svgEl("text", { x: x(t), y: height - 4, "text-anchor": anchor });
        label.textContent = text;
        nodes.push(label);
      });
    let legendX = left;
    const last = visible[visible.length - 1] || {};
    for (const series of chart.series) {
      nodes.push(svgEl("path", { class: "series", "data-series": series.key,
        stroke: series.color, d: pathOf(series.key, x, y) }));
      const value = last[series.key];
      const legend = svgEl("text", { x: legendX, y: 12 });
      legend.textContent = `${series.label} ${value === undefined || value === null
        ? "–" : number(value, chart.unit)}`;
      legend.style.fill = series.color; // over the stylesheet's grey
      nodes.push(legend);
      legendX += 150;
    }
    svg.replaceChildren(...nodes);
  }

  function drawCharts() {
    CHARTS.forEach(drawChart);
  }

  // --- the feed -------------------------------------------------------------------

  function onStats(stats) {
    if (brokerDown) logEvent("the broker answers again", "ok");
    brokerDown = false;
    showBanner("");
    setStatus("ok", "live");
    if (stats.point) {
      points.push(stats.point);
      const oldest = stats.point.t - windowS;
      while (points.length && points[0].t < oldest) points.shift();
    }
    renderTotals(stats.broker, stats.brokers || []);
    renderWorkers(stats);
    renderGateways(stats.gateways);
    drawCharts();
  }

  function onUnavailable(error) {
    if (!brokerDown) logEvent(`broker: ${error.error}`, "bad");
    brokerDown = true;
    setStatus("down", "broker unreachable");
    showBanner(`Broker: ${error.error} (${error.code}). ` +
      "The numbers below are the last it gave; this page recovers by itself.");
  }

  function connect() {
    const source = new EventSource("stats/stream");
    const handle = (handler) => (event) => {
      lastEvent = Date.now();
      handler(JSON.parse(event.data));
    };
    source.addEventListener("history", handle((history) => {
      intervalS = history.interval_s;
      windowS = history.window_s;
      points = history.points;
      drawCharts();
    }));
    source.addEventListener("stats", handle(onStats));
    source.addEventListener("unavailable", handle(onUnavailable));
    source.onerror = () => {
      setStatus("down", "gateway unreachable");
      showBanner("The gateway's stats feed does not answer (the gateway is down, or " +
        "serves its limit of feeds); reconnecting.");
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, RETRY_MS);
    };
  }

  // Say how fresh the numbers are, and when they stop coming.
  setInterval(() => {
    if (!lastEvent) return;
    const age = (Date.now() - lastEvent) / 1000;
    $("updated").textContent = `updated ${age.toFixed(1)} s ago`;
    if (age > 3 * intervalS + 2 && !brokerDown && $("status").classList.contains("ok")) {
      setStatus("stale", "no updates");
    }
  }, 500);
  window.addEventListener("resize", drawCharts);
  drawCharts();
  connect();
})();

/* Nexus dashboard: keeps the server-rendered page current over Server-Sent Events.
 *
 * GET /v1/events sends `stats` (totals, fleet, model matrix, chart points) every 2 s,
 * `backend` (a fleet entry) when a health check ran or the fleet changed, and `request`
 * (a history entry) for every finished request. Nothing is fetched from anywhere else.
 * Everything a backend or a client chose (ids, model names, messages) is put in the page
 * with textContent, never parsed as HTML.
 */
(function () {
  "use strict";

  var MAX_ROWS = 50;
  var SVG_NS = "http://www.w3.org/2000/svg";
  var STATUSES = { healthy: true, unhealthy: true, unknown: true };

  var backends = {};     // id -> the latest known state of that backend
  var signatures = {};   // id -> JSON of the state its card shows
  var matrixSignature = "";
  var lastSeries = null;
  var openedAt = 0;
  var source = null;
  var retryTimer = null;

  function byId(id) { return document.getElementById(id); }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }

  /* -- formats: the same as nexus/dashboard/page.py ------------------------------------- */

  function fmtInt(n) {
    return n === null || n === undefined ? "\u2013" : Number(n).toLocaleString("en-US");
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) { return "\u2013"; }
    if (ms === 0) { return "0"; }
    if (ms < 1) { return ms.toFixed(2) + " ms"; }
    if (ms < 100) { return ms.toFixed(1) + " ms"; }
    if (ms < 1000) { return ms.toFixed(0) + " ms"; }
    return (ms / 1000).toFixed(2) + " s";
  }

  function fmtPercent(rate) { return (rate * 100).toFixed(1) + " %"; }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function fmtUptime(seconds) {
    var s = Math.max(0, Math.floor(seconds));
    var days = Math.floor(s / 86400); s -= days * 86400;
    var hours = Math.floor(s / 3600); s -= hours * 3600;
    var minutes = Math.floor(s / 60); s -= minutes * 60;
    if (days) { return days + "d " + hours + "h"; }
    if (hours) { return hours + "h " + pad(minutes) + "m"; }
    if (minutes) { return minutes + "m " + pad(s) + "s"; }
    return s + "s";
  }

  function clock(date) {
    return pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
  }

  function timeNode(stamp) {
    if (!stamp) { return document.createTextNode("never"); }
    var node = el("time", null, clock(new Date(stamp)));
    node.dateTime = stamp;
    node.title = stamp;
    return node;
  }

  function statusKind(status) { return STATUSES[status] ? status : "unknown"; }

  /* -- connection ------------------------------------------------------------------------ */

  function setLive(kind, text) {
    var node = byId("live");
    if (node) {
      node.className = "live " + kind;
      node.textContent = text;
    }
  }

  function connect() {
    retryTimer = null;
    setLive("retry", "connecting\u2026");
    source = new EventSource("/v1/events");
    source.addEventListener("open", function () {
      openedAt = Date.now();
      setLive("on", "live");
      clearRequests();  // the stream replays the last requests first
    });
    source.addEventListener("error", function () {
      if (source.readyState === EventSource.CLOSED) {
        // Refused (401, 404, 503): EventSource gives up by itself; try again later.
        source.close();
        setLive("retry", "disconnected, retrying\u2026");
        if (!retryTimer) { retryTimer = setTimeout(connect, 5000); }
      } else {
        setLive("retry", "reconnecting\u2026");  // EventSource retries on its own
      }
    });
    source.addEventListener("stats", function (event) { onStats(JSON.parse(event.data)); });
    source.addEventListener("backend", function (event) { onBackend(JSON.parse(event.data)); });
    source.addEventListener("request", function (event) { onRequest(JSON.parse(event.data)); });
  }

  /* -- totals ---------------------------------------------------------------------------- */

  function setTotal(key, value, detail) {
    var node = document.querySelector('[data-total="' + key + '"]');
    if (node) { node.textContent = value; }
    if (detail !== undefined) {
      var small = document.querySelector('[data-total-detail="' + key + '"]');
      if (small) { small.textContent = detail; }
    }
  }

  function onStats(stats) {
    setTotal("uptime", fmtUptime(stats.uptime_seconds));
    setTotal("requests", fmtInt(stats.requests.total), fmtInt(stats.requests.errors) + " errors");
    setTotal("error_rate", fmtPercent(stats.error_rate));
    setTotal("tokens", fmtInt(stats.tokens.total),
      fmtInt(stats.tokens.prompt) + " in \u00b7 " + fmtInt(stats.tokens.completion) + " out");
    setTotal("backends", fmtInt(stats.fleet.healthy) + " / " + fmtInt(stats.fleet.total));
    setTotal("models", fmtInt(stats.matrix.length));

    var seen = {};
    stats.backends.forEach(function (backend) {
      seen[backend.id] = true;
      backends[backend.id] = backend;
      renderCard(backend);
    });
    Object.keys(backends).forEach(function (id) {
      if (!seen[id]) { removeCard(id); }
    });
    renderMatrix(stats);
    lastSeries = stats.series;
    drawCharts();
  }

  /* -- backend cards --------------------------------------------------------------------- */

  function onBackend(entry) {
    if (entry.removed) {
      removeCard(entry.id);
      return;
    }
    var backend = backends[entry.id] || {
      id: entry.id, models: [], pending: 0, requests: 0, errors: 0, average_latency_ms: 0
    };
    // A fleet entry: `models` is a count there, and its latency is a moving average;
    // the card keeps the list and the mean from the last stats.
    backend.status = entry.status;
    backend.type = entry.type;
    backend.source = entry.source;
    backend.last_check = entry.last_check;
    backend.last_error = entry.last_error;
    backends[entry.id] = backend;
    renderCard(backend);
  }

  function findCard(id) {
    var cards = byId("cards");
    if (!cards) { return null; }
    for (var i = 0; i < cards.children.length; i++) {
      if (cards.children[i].dataset.backend === id) { return cards.children[i]; }
    }
    return null;
  }

  function field(name, label, content, cls) {
    var wrap = el("div", cls || null);
    wrap.appendChild(el("dt", null, label));
    var dd = el("dd");
    dd.dataset.f = name;
    if (typeof content === "string") { dd.textContent = content; } else { dd.appendChild(content); }
    wrap.appendChild(dd);
    return wrap;
  }

  function buildCard(backend) {
    var kind = statusKind(backend.status);
    var card = el("article", "card s-" + kind);
    card.dataset.backend = backend.id;
    var head = el("header");
    head.appendChild(el("h3", null, backend.id));
    var badge = el("span", "badge s-" + kind);
    badge.appendChild(el("span", "dot"));
    badge.appendChild(document.createTextNode(backend.status));
    head.appendChild(badge);
    card.appendChild(head);

    var models = el("ul", "chips");
    if (backend.models.length) {
      backend.models.forEach(function (model) { models.appendChild(el("li", null, model)); });
    } else {
      models.appendChild(el("li", null, "none"));
    }
    var list = el("dl");
    list.appendChild(field("type", "Type", String(backend.type)));
    list.appendChild(field("source", "Source", String(backend.source)));
    list.appendChild(field("pending", "Pending", fmtInt(backend.pending)));
    list.appendChild(field("latency", "Avg latency",
      backend.requests ? fmtMs(backend.average_latency_ms) : "\u2013"));
    list.appendChild(field("requests", "Requests", fmtInt(backend.requests)));
    list.appendChild(field("errors", "Errors", fmtInt(backend.errors)));
    list.appendChild(field("last_check", "Last check", timeNode(backend.last_check), "wide"));
    list.appendChild(field("models", "Models (" + backend.models.length + ")", models, "wide"));
    if (backend.last_error) {
      list.appendChild(field("last_error", "Last error", String(backend.last_error),
        "wide last-error"));
    }
    card.appendChild(list);
    return card;
  }

  function renderCard(backend) {
    var cards = byId("cards");
    if (!cards) { return; }
    var signature = JSON.stringify(backend);
    var old = findCard(backend.id);
    if (old && signatures[backend.id] === signature) { return; }
    signatures[backend.id] = signature;
    var card = buildCard(backend);
    if (old) {
      cards.replaceChild(card, old);
      return;
    }
    var empty = cards.querySelector(".empty");
    if (empty) { cards.removeChild(empty); }
    var before = null;  // cards are sorted by id
    for (var i = 0; i < cards.children.length; i++) {
      if (cards.children[i].dataset.backend > backend.id) { before = cards.children[i]; break; }
    }
    cards.insertBefore(card, before);
  }

  function removeCard(id) {
    delete backends[id];
    delete signatures[id];
    var card = findCard(id);
    if (card) { card.parentNode.removeChild(card); }
  }

  /* -- model x backend matrix ------------------------------------------------------------ */

  function renderMatrix(stats) {
    var box = byId("matrix");
    if (!box) { return; }
    var ids = stats.backends.map(function (b) { return b.id; });
    var signature = JSON.stringify([ids, stats.matrix, stats.aliases]);
    if (signature === matrixSignature) { return; }
    matrixSignature = signature;
    box.textContent = "";
    if (!stats.matrix.length) {
      box.appendChild(el("p", "empty", "No backend lists a model yet."));
      return;
    }
    var scroll = el("div", "scroll");
    var table = el("table", "matrix");
    var head = el("thead");
    var headRow = el("tr");
    var corner = el("th", null, "Model");
    corner.scope = "col";
    headRow.appendChild(corner);
    ids.forEach(function (id) {
      var th = el("th", null, id);
      th.scope = "col";
      headRow.appendChild(th);
    });
    head.appendChild(headRow);
    table.appendChild(head);
    var body = el("tbody");
    stats.matrix.forEach(function (row) {
      var tr = el("tr");
      var name = el("th", null, row.model);
      name.scope = "row";
      tr.appendChild(name);
      ids.forEach(function (id) {
        var cell = row.backends[id];
        if (!cell) {
          var no = el("td", "no");
          no.appendChild(el("span", "sr", "not listed"));
          tr.appendChild(no);
          return;
        }
        var caps = cell.capabilities;
        var text = caps === null ? "\u2713" : (caps.length ? caps.join(", ") : "\u2713 (none)");
        var td = el("td", "yes s-" + statusKind(cell.status));
        td.title = id + ": " + cell.status;
        td.appendChild(el("span", "dot"));
        td.appendChild(document.createTextNode(text));
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    table.appendChild(body);
    scroll.appendChild(table);
    box.appendChild(scroll);
    var aliases = Object.keys(stats.aliases);
    if (aliases.length) {
      var line = el("div", "aliases", "Aliases ");
      var chips = el("ul", "chips");
      aliases.forEach(function (alias) {
        chips.appendChild(el("li", null, alias + " \u2192 " + stats.aliases[alias]));
      });
      line.appendChild(chips);
      box.appendChild(line);
    }
  }

  /* -- last requests --------------------------------------------------------------------- */

  function clearRequests() {
    var table = byId("requests");
    if (!table) { return; }
    while (table.tBodies.length) { table.removeChild(table.tBodies[0]); }
  }

  function cell(cls, content) {
    var td = el("td", cls);
    if (typeof content === "string") { td.textContent = content; } else { td.appendChild(content); }
    return td;
  }

  function onRequest(r) {
    var table = byId("requests");
    if (!table) { return; }
    var failed = r.status !== "success";
    var body = el("tbody", failed ? "req error" : "req");
    body.dataset.request = r.request_id;
    if (Date.now() - openedAt > 1000) { body.className += " fresh"; }  // not the replay
    var row = el("tr");
    row.appendChild(cell("time", timeNode(r.finished_at)));
    row.appendChild(cell("id", el("code", null, r.request_id)));
    var route = el("td", "route");
    route.appendChild(document.createTextNode(r.model === null ? "\u2013" : r.model));
    route.appendChild(document.createTextNode(" "));
    route.appendChild(el("span", "arrow", "\u2192"));
    route.appendChild(document.createTextNode(" " + (r.backend || "\u2013")));
    row.appendChild(route);
    row.appendChild(cell("status", String(r.status_code)));
    row.appendChild(cell("num", fmtMs(r.latency_ms)));
    row.appendChild(cell("num", fmtMs(r.ttft_ms)));
    var tokens = "\u2013";
    if (r.tokens_prompt !== null || r.tokens_completion !== null) {
      tokens = fmtInt(r.tokens_prompt || 0) + " / " + fmtInt(r.tokens_completion || 0);
    }
    row.appendChild(cell("num", tokens));
    body.appendChild(row);
    if (failed) {
      var message = el("tr", "message");
      var text = el("td", null, (r.error_type || "error") + ": " + (r.error_message || ""));
      text.colSpan = 7;
      message.appendChild(text);
      body.appendChild(message);
    }
    table.insertBefore(body, table.tBodies.length ? table.tBodies[0] : null);
    while (table.tBodies.length > MAX_ROWS) {
      table.removeChild(table.tBodies[table.tBodies.length - 1]);
    }
    var none = byId("no-requests");
    if (none) { none.parentNode.removeChild(none); }
  }

  /* -- charts (SVG) ---------------------------------------------------------------------- */

  function svg(tag, attrs, cls) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs).forEach(function (name) { node.setAttribute(name, String(attrs[name])); });
    if (cls) { node.setAttribute("class", cls); }
    return node;
  }

  function niceMax(value) {
    if (!(value > 0)) { return 1; }
    var power = Math.pow(10, Math.floor(Math.log10(value)));
    var m = value / power;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * power;
  }

  function fmtRate(value) {
    if (value >= 100) { return value.toFixed(0); }
    if (value >= 10) { return value.toFixed(1).replace(/\.0$/, ""); }
    return value.toFixed(2).replace(/\.?0+$/, "");
  }

  // A chart frame: grid, y labels (0, half, max), time labels; returns its geometry.
  function chartFrame(box, yMax, yLabel, count, bucket) {
    var width = Math.max(200, box.clientWidth);
    var height = 160;
    var g = { left: 46, right: 6, top: 8, bottom: 18 };
    g.width = width - g.left - g.right;
    g.height = height - g.top - g.bottom;
    g.step = g.width / count;
    g.yMax = yMax;
    var root = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img" });
    [0, 0.5, 1].forEach(function (f) {
      var y = g.top + g.height * (1 - f);
      root.appendChild(svg("line", { x1: g.left, x2: width - g.right, y1: y, y2: y }, "grid"));
      var label = svg("text", { x: g.left - 6, y: y + 3, "text-anchor": "end" }, "axis");
      label.textContent = yLabel(yMax * f);
      root.appendChild(label);
    });
    var minutes = Math.round(count * bucket / 60);
    [minutes, Math.round(minutes * 2 / 3), Math.round(minutes / 3), 0].forEach(function (m, i) {
      var x = g.left + g.width * (1 - m * 60 / (count * bucket));
      var anchor = i === 0 ? "start" : i === 3 ? "end" : "middle";
      var label = svg("text", { x: x, y: height - 4, "text-anchor": anchor }, "axis");
      label.textContent = m ? "\u2212" + m + " min" : "now";
      root.appendChild(label);
    });
    g.x = function (i) { return g.left + i * g.step; };
    g.y = function (v) { return g.top + g.height * (1 - Math.min(v, yMax) / yMax); };
    g.root = root;
    return g;
  }

  function pointTime(point) { return clock(new Date(point[0] * 1000)); }

  function drawRate(box, points, bucket) {
    var peak = 0;
    points.forEach(function (p) { peak = Math.max(peak, p[1] + p[2] + p[3]); });
    var g = chartFrame(box, niceMax(peak), function (v) { return fmtRate(v) + "/s"; },
      points.length, bucket);
    var barWidth = Math.max(1, g.step - 1);
    points.forEach(function (p, i) {
      var total = p[1] + p[2] + p[3];
      if (!total) { return; }
      var group = svg("g", {});
      var title = svg("title", {});
      title.textContent = pointTime(p) + ": " + fmtRate(p[1]) + " ok, " + fmtRate(p[2]) +
        " errors, " + fmtRate(p[3]) + " client left (per second)";
      group.appendChild(title);
      var base = 0;
      [[p[1], "success"], [p[2], "error"], [p[3], "client_disconnect"]].forEach(function (part) {
        if (!part[0]) { return; }
        var top = g.y(base + part[0]);
        var bottom = g.y(base);
        group.appendChild(svg("rect", {
          x: g.x(i), y: top, width: barWidth, height: Math.max(1, bottom - top)
        }, part[1]));
        base += part[0];
      });
      g.root.appendChild(group);
    });
    box.textContent = "";
    box.appendChild(g.root);
  }

  function drawLatency(box, points, bucket) {
    var peak = 0;
    points.forEach(function (p) { if (p[5] !== null) { peak = Math.max(peak, p[5]); } });
    var g = chartFrame(box, niceMax(peak), fmtMs, points.length, bucket);
    [[4, "p50", "dot50"], [5, "p95", "dot95"]].forEach(function (line) {
      var path = "";
      var previous = false;
      points.forEach(function (p, i) {
        var v = p[line[0]];
        if (v === null) { previous = false; return; }
        var x = g.x(i) + g.step / 2;
        path += (previous ? "L" : "M") + x.toFixed(1) + " " + g.y(v).toFixed(1);
        previous = true;
        var dot = svg("circle", { cx: x.toFixed(1), cy: g.y(v).toFixed(1), r: 1.8 }, line[2]);
        var title = svg("title", {});
        title.textContent = pointTime(p) + ": " + line[1] + " " + fmtMs(v);
        dot.appendChild(title);
        g.root.appendChild(dot);
      });
      if (path) { g.root.appendChild(svg("path", { d: path }, line[1])); }
    });
    box.textContent = "";
    box.appendChild(g.root);
  }

  function drawCharts() {
    if (!lastSeries) { return; }
    var rate = byId("chart-rps");
    var latency = byId("chart-latency");
    if (rate) { drawRate(rate, lastSeries.points, lastSeries.bucket_seconds); }
    if (latency) { drawLatency(latency, lastSeries.points, lastSeries.bucket_seconds); }
  }

  var resizePending = false;
  window.addEventListener("resize", function () {
    if (resizePending) { return; }
    resizePending = true;
    window.requestAnimationFrame(function () {
      resizePending = false;
      drawCharts();
    });
  });

  if (window.EventSource) { connect(); }
}());

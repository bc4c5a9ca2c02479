// The gapwatch dashboard: polls /dashboard/data (admin token from the URL fragment, kept in
// sessionStorage) and draws the panels of the shipped Grafana dashboards with Chart.js.
// Text from the data only ever goes into the page through textContent.
(function () {
  "use strict";

  var TOKEN_KEY = "gapwatch-dashboard-token";
  var ACTIONS = ["observe", "annotate", "redact", "retry", "block"];
  var COLORS = {
    requests: "#3b6fd8", errors_5xx: "#c62828", upstream_errors: "#ef6c00",
    blocked: "#c62828", redacted: "#8e44ad", model_change: "#f2b705",
    p50: "#3b6fd8", p95: "#1d2430", overhead_p50: "#2e7d32", overhead_p99: "#7cb342",
    observe: "#9aa5b8", annotate: "#3b6fd8", redact: "#8e44ad", retry: "#ef6c00", block: "#c62828"
  };
  var charts = {};
  var refreshMs = 2000;
  var timer = null;

  function token() {
    var m = /(?:^|[#&])token=([^&]+)/.exec(window.location.hash);
    if (m) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
      history.replaceState(null, "", window.location.pathname);  // the token leaves the address bar
    }
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function setStatus(text, bad) {
    var el = document.getElementById("status");
    el.textContent = text;
    el.className = bad ? "status error" : "status";
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString([], {hour12: false});
  }

  function pct(v) { return v === null || v === undefined ? "–" : (v * 100).toFixed(1) + "%"; }
  function ms(v) { return v === null || v === undefined ? "–" : (v * 1000).toFixed(v < 0.01 ? 2 : 0) + " ms"; }
  function num(v) { return v === null || v === undefined ? "–" : String(v); }

  function lineChart(id, keys, names) {
    return new Chart(document.getElementById(id), {
      type: "line",
      data: {labels: [], datasets: keys.map(function (k, i) {
        return {label: names[i], data: [], borderColor: COLORS[k], backgroundColor: COLORS[k],
                borderWidth: 2, pointRadius: 0, tension: 0.2, spanGaps: true};
      })},
      options: {animation: false, responsive: true, maintainAspectRatio: false,
                interaction: {mode: "index", intersect: false},
                scales: {y: {beginAtZero: true}, x: {ticks: {maxTicksLimit: 8}}},
                plugins: {legend: {position: "bottom", labels: {boxWidth: 12}}}}
    });
  }

  // a bar at each sample during which the upstream's reported model identity changed
  function changeMarks(series, changes) {
    var at = changes.map(function (c) { return Date.parse(c.at) / 1000; });
    var top = Math.max.apply(null, [1].concat(series.requests));
    return series.t.map(function (t, i) {
      var from = i > 0 ? series.t[i - 1] : t - 1;
      return at.some(function (a) { return a > from - 1 && a <= t; }) ? top : null;
    });
  }

  function identity(model, fingerprint) {
    return (model || "–") + " · " + (fingerprint || "no fingerprint");
  }

  function findingsChart() {
    return new Chart(document.getElementById("findings-chart"), {
      type: "bar",
      data: {labels: [], datasets: ACTIONS.map(function (a) {
        return {label: a, data: [], backgroundColor: COLORS[a]};
      })},
      options: {animation: false, responsive: true, maintainAspectRatio: false, indexAxis: "y",
                scales: {x: {stacked: true, beginAtZero: true}, y: {stacked: true}},
                plugins: {legend: {position: "bottom", labels: {boxWidth: 12}}}}
    });
  }

  function setSeries(chart, series, keys, scale) {
    chart.data.labels = series.t.map(clock);
    keys.forEach(function (k, i) {
      chart.data.datasets[i].data = series[k].map(function (v) { return v === null ? null : v * scale; });
    });
    chart.update("none");
    return keys.some(function (k) { return series[k].some(function (v) { return v !== null && v > 0; }); });
  }

  function filled(panel, ok) {
    document.querySelector('[data-panel="' + panel + '"]').dataset.filled = ok ? "true" : "false";
  }

  function stats(id, items) {
    var box = document.getElementById(id);
    box.replaceChildren();
    items.forEach(function (it) {
      var d = document.createElement("div");
      d.className = "stat";
      var b = document.createElement("b");
      b.textContent = it[1];
      var s = document.createElement("span");
      s.textContent = it[0];
      d.append(b, s);
      box.append(d);
    });
  }

  function table(id, rows, cells, emptyText) {
    var body = document.querySelector("#" + id + " tbody");
    body.replaceChildren();
    if (!rows.length) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      td.colSpan = document.querySelectorAll("#" + id + " th").length;
      td.className = "empty";
      td.textContent = emptyText;
      tr.append(td);
      body.append(tr);
      return false;
    }
    rows.forEach(function (row) {
      var tr = document.createElement("tr");
      cells(row).forEach(function (c) {
        var td = document.createElement("td");
        td.textContent = c[0];
        if (c[1]) { td.className = c[1]; }
        tr.append(td);
      });
      body.append(tr);
    });
    return true;
  }

  function render(d) {
    var t = d.totals;
    stats("traffic-stats", [["requests", t.requests], ["5xx", t.errors_5xx], ["upstream errors", t.upstream_errors],
                            ["in flight", t.in_flight]]);
    filled("traffic", setSeries(charts.traffic, d.traffic, ["requests", "errors_5xx", "upstream_errors"], 1));
    charts.traffic.data.datasets[3].data = changeMarks(d.traffic, d.model_changes);
    charts.traffic.update("none");
    stats("actions-stats", [["blocked", t.blocked], ["redacted", t.redacted], ["annotated", t.annotated]]);
    var acted = setSeries(charts.actions, d.traffic, ["blocked", "redacted"], 1);
    filled("actions", acted || t.blocked + t.redacted > 0);
    filled("latency", setSeries(charts.latency, d.latency, ["p50", "p95", "overhead_p50", "overhead_p99"], 1000));

    var dets = Object.keys(d.findings);
    charts.findings.data.labels = dets;
    ACTIONS.forEach(function (a, i) {
      charts.findings.data.datasets[i].data = dets.map(function (det) { return d.findings[det][a] || 0; });
    });
    charts.findings.update("none");
    filled("findings", dets.length > 0);

    filled("scorecard", table("scorecard", d.scorecard, function (r) {
      return [[r.model], [num(r.requests)], [pct(r.error_rate)], [pct(r.schema_valid)], [pct(r.unsupported_claims)],
              [pct(r.leak_rate)], [pct(r.injection_rate)], [pct(r.abstention_rate)],
              [r.grounding_mean === null ? "–" : r.grounding_mean.toFixed(2)], [ms(r.p90_latency)]];
    }, "no requests yet"));
    filled("incidents", table("incidents", d.incidents, function (r) {
      var cat = r.path ? r.category + " " + r.path : r.category;
      return [[clock(r.ts)], [r.detector], [cat, "sev-" + r.severity], [r.action, "act-" + r.action],
              [r.evidence || "–", "evidence"], [r.model], [r.request_id, "id"]];
    }, "no incidents"));
    filled("model_changes", table("model-changes", d.model_changes, function (r) {
      return [[new Date(r.at).toLocaleTimeString([], {hour12: false})], [r.route], [r.model],
              [identity(r.before_model, r.before_fingerprint)], [identity(r.after_model, r.after_fingerprint)]];
    }, "no model change seen"));
    filled("alerts", table("alerts", d.alerts, function (r) {
      return [[r.alertname], [r.severity, "sev-" + r.severity], [r.signal], [r.value], [r.model], [r.route],
              [r.since ? new Date(r.since).toLocaleTimeString([], {hour12: false}) : "–"]];
    }, "no alert is firing"));
    setStatus("updated " + clock(d.generated_at) + " · window " + Math.round(d.window_seconds) + " s", false);
  }

  function needToken(message) {
    setStatus(message, true);
    document.getElementById("token-form").hidden = false;
  }

  function refresh() {
    var tok = token();
    if (!tok) { needToken("admin token needed"); return; }
    fetch("/dashboard/data", {headers: {"Authorization": "Bearer " + tok}, cache: "no-store"})
      .then(function (r) {
        if (r.status === 401 || r.status === 403) { throw new Error("token"); }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (d) {
        render(d);
        var next = Math.max(500, d.refresh_seconds * 1000);
        if (next !== refreshMs) { refreshMs = next; schedule(); }
      })
      .catch(function (e) {
        if (e.message === "token") { needToken("the admin token was not accepted"); return; }
        setStatus("cannot reach gapwatch (" + e.message + "); retrying", true);
      });
  }

  function schedule() {
    if (timer !== null) { clearInterval(timer); }
    timer = setInterval(refresh, refreshMs);
  }

  document.getElementById("token-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value);
    document.getElementById("token-form").hidden = true;
    refresh();
  });

  charts.traffic = lineChart("traffic-chart", ["requests", "errors_5xx", "upstream_errors"],
                             ["requests", "server errors (5xx)", "upstream errors"]);
  charts.traffic.data.datasets.push({type: "bar", label: "model change", data: [], barThickness: 3,
                                     backgroundColor: COLORS.model_change});
  charts.actions = lineChart("actions-chart", ["blocked", "redacted"], ["blocked", "redacted"]);
  charts.latency = lineChart("latency-chart", ["p50", "p95", "overhead_p50", "overhead_p99"],
                             ["p50 end to end", "p95 end to end", "p50 proxy overhead", "p99 proxy overhead"]);
  charts.findings = findingsChart();
  refresh();
  schedule();
})();

// The gateway's live page: reads GET /v1/queue/events (server-sent JSON snapshots) and draws them.
// Plain browser JavaScript, no library: the page works offline, served by the gateway itself.
"use strict";

const LEVELS = ["high", "normal", "low", "batch"];
const KEY_STORE = "llm-queue-gateway-key";
const keysOn = document.body.dataset.keys === "on";
let key = sessionStorage.getItem(KEY_STORE) || "";
let reader = null;

const $ = (id) => document.getElementById(id);

function escape(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function headers() {
  return key ? { Authorization: "Bearer " + key } : {};
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  return value < 10 ? value.toFixed(2) + " s" : value.toFixed(0) + " s";
}

function setState(text, kind) {
  const pill = $("state");
  pill.textContent = text;
  pill.className = "pill " + (kind || "");
}

function askForKey(message) {
  $("key-form").hidden = false;
  $("forget").hidden = true;
  $("key-error").textContent = message || "";
  setState("needs a key", "lost");
}

async function connect() {
  if (keysOn && !key) {
    askForKey("");
    return;
  }
  try {
    const response = await fetch("/v1/queue/events", { headers: headers() });
    if (response.status === 401) {
      sessionStorage.removeItem(KEY_STORE);
      key = "";
      askForKey("that key was refused");
      return;
    }
    if (!response.ok) throw new Error("the events answered " + response.status);
    $("key-form").hidden = true;
    $("forget").hidden = !keysOn;
    reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) render(JSON.parse(line.slice(6)));
        }
      }
    }
  } catch (error) {
    // The gateway restarted or the network dropped: try again shortly.
  }
  reader = null;
  setState("reconnecting", "lost");
  setTimeout(connect, 1000);
}

function render(s) {
  setState(s.running ? "live" : "draining", s.running ? "live" : "draining");
  $("viewer").textContent = s.viewer ? "as " + s.viewer.name + (s.viewer.admin ? " (admin)" : "") : "";
  const q = s.queue;
  $("waiting").textContent = q.waiting + " / " + q.max_queue_size;
  $("in-flight").textContent = q.in_flight + " / " + q.max_concurrent;
  $("rps").textContent = s.rates.requests_per_s.toFixed(1);
  $("tps").textContent = s.rates.tokens_per_s.toFixed(0);
  $("completed").textContent = s.totals.completed;
  $("failed").textContent = s.totals.failed + s.totals.timed_out + s.totals.cancelled;
  $("rejected").textContent = s.totals.rejected;
  drawCharts(s.history);
  $("backends").innerHTML = s.backends.map(backend).join("");
  $("levels").className = "levels";
  $("levels").innerHTML = LEVELS.map((name) => level(name, s.waiting[name])).join("");
  $("rejections").innerHTML = counts(s.rejections);
  $("errors").innerHTML = counts(s.upstream_errors);
}

function backend(b) {
  const health = b.healthy ? '<span class="up">up</span>' : '<span class="down">down</span>';
  const breaker = b.breaker ? " · breaker " + escape(b.breaker) : "";
  const latency = b.latency_s === null ? "" : " · latency " + seconds(b.latency_s);
  const parked = b.parked ? " · " + b.parked + " parked" : "";
  const budgets = budgetText(b.rate_limits);
  const slots = b.slots.map((slot) => {
    if (!slot.busy) return '<div class="slot" data-slot="free">free</div>';
    const speed = slot.tokens_per_s === null ? "" : " · " + slot.tokens_per_s.toFixed(1) + " tok/s";
    return (
      '<div class="slot busy p-' + escape(slot.priority) + '" data-slot="busy">' +
      '<div class="id">' + escape(slot.request_id || "(another key)") + "</div>" +
      "<div>" + escape(slot.key || "") + " " + escape(slot.priority) + "</div>" +
      "<div>" + seconds(slot.elapsed_s) + speed + "</div></div>"
    );
  });
  return (
    '<div class="backend"><b>' + escape(b.name) + "</b>" +
    '<span class="meta">' + escape(b.type) + " · " + health + breaker + " · " + b.in_flight + "/" + b.max_concurrent +
    latency + parked + budgets + "</span>" + '<div class="slots">' + slots.join("") + "</div></div>"
  );
}

function budgetText(limits) {
  // Only the budgets in force: a null one is not set, a pause of 0 s is no pause.
  const parts = [];
  for (const [name, value] of Object.entries(limits || {})) {
    if (value === null || value === 0) continue;
    if (typeof value === "object") {
      const left = value.remaining ?? value.left;
      parts.push(escape(name) + " " + (left !== undefined ? escape(left) + "/" : "") + escape(value.limit ?? JSON.stringify(value)));
    } else {
      parts.push(escape(name) + " " + escape(value));
    }
  }
  return parts.length ? " · " + parts.join(", ") : "";
}

function level(name, data) {
  const rows = data.requests.map(
    (r) =>
      '<tr data-request="' + escape(r.id) + '"><td class="num">' + r.position + '</td><td class="mono">' + escape(r.id) +
      (r.parked ? " (parked)" : "") + "</td><td>" + escape(r.key || "") + '</td><td class="num">' + seconds(r.waited_s) +
      '</td><td class="num">' + seconds(r.eta_s) + '</td><td><button class="cancel" data-cancel="' + escape(r.id) +
      '">cancel</button></td></tr>'
  );
  const more = data.count - data.requests.length;
  return (
    '<div class="level" data-level="' + name + '"><h3><span class="' + name + '" style="padding:0 6px;border-radius:3px">&nbsp;</span> ' +
    name + ' <span class="count">' + data.count + "</span> waiting</h3>" +
    '<table><tr><th class="num">#</th><th>request</th><th>key</th><th class="num">waited</th><th class="num">ETA</th><th></th></tr>' +
    rows.join("") + "</table>" + (more > 0 ? '<div class="more">and ' + more + " more not listed</div>" : "") + "</div>"
  );
}

function counts(values) {
  return Object.entries(values)
    .map(([name, n]) => "<tr><td>" + escape(name) + '</td><td class="num">' + n + "</td></tr>")
    .join("");
}

function polyline(values, max, color, count) {
  const step = 600 / Math.max(count - 1, 1);
  const points = [];
  values.forEach((v, i) => {
    if (v !== null && v !== undefined) points.push((i * step).toFixed(1) + "," + (158 - (v / max) * 150).toFixed(1));
  });
  return '<polyline stroke="' + color + '" points="' + points.join(" ") + '"/>';
}

function drawCharts(h) {
  const n = h.at.length;
  const depthMax = Math.max(1, ...LEVELS.flatMap((name) => h[name]));
  const style = getComputedStyle(document.documentElement);
  $("depth").innerHTML = LEVELS.map((name) => polyline(h[name], depthMax, style.getPropertyValue("--" + name), n)).join("");
  $("depth-max").textContent = "· max " + depthMax;
  const waits = [...h.wait_p50, ...h.wait_p95].filter((v) => v !== null);
  const waitMax = Math.max(0.001, ...waits);
  $("wait").innerHTML = polyline(h.wait_p50, waitMax, "#63e6be", n) + polyline(h.wait_p95, waitMax, "#e599f7", n);
  $("wait-max").textContent = "· max " + seconds(waitMax);
}

document.addEventListener("click", async (event) => {
  const id = event.target.dataset && event.target.dataset.cancel;
  if (!id) return;
  event.target.disabled = true;
  await fetch("/v1/queue/request/" + encodeURIComponent(id), { method: "DELETE", headers: headers() });
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  key = $("key").value.trim();
  $("key").value = "";
  sessionStorage.setItem(KEY_STORE, key);
  connect();
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORE);
  key = "";
  $("key").value = "";
  if (reader) reader.cancel();
});

connect();

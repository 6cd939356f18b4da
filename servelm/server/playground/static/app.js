// servelm playground. Plain JavaScript, no build step; uPlot (vendor/) draws the metrics charts.
// Every request goes to this page's own origin through the server's public API, with the key the user
// typed (kept in sessionStorage: this tab only).
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY_SLOT = "servelm.playground.key";
const state = { key: sessionStorage.getItem(KEY_SLOT), me: null, history: [], abort: null };

// ------------------------------------------------------------------ API and errors
class ServerError extends Error {
  constructor(status, body, headers) {
    const err = (body && body.error) || {};
    super(humanMessage(status, err, headers));
    this.status = status;
    this.code = err.code;
  }
}

// Turns a server error into a sentence a person understands (the server's own message comes along).
function humanMessage(status, err, headers) {
  const said = err.message ? ` (${err.message})` : "";
  const retry = headers && headers.get("Retry-After");
  if (err.code === "content_filter") return `The safety filter stopped this message${said}. Rephrase it and try again.`;
  if (status === 401) return "This API key was not accepted: it is unknown or revoked. Check it and sign in again.";
  if (status === 403) return `This API key is not allowed to do that${said}.`;
  if (status === 429) return `Too many requests for this key right now; wait ${retry ? retry + " s" : "a moment"} and try again${said}.`;
  if (status === 503) return `The server is busy or not ready; try again in ${retry ? retry + " s" : "a few seconds"}${said}.`;
  if (status === 413) return `That is too large for this server${said}.`;
  if (status === 404 && /disabled|off/.test(err.code || "")) return `Not enabled on this server${said}.`;
  if (status >= 500) return `The server failed on this request${said}. Try again; if it keeps failing, check the server log.`;
  return err.message || `The server answered ${status}.`;
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.key}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new Error("Cannot reach the server. Is it still running?");
  }
  const data = await r.json().catch(() => null);
  if (!r.ok && r.status !== 207) throw new ServerError(r.status, data, r.headers);
  return data;
}

// Reads a server-sent-events response; calls onEvent(obj) per `data:` JSON line until [DONE].
async function readSSE(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        const obj = JSON.parse(payload);
        if (obj.error) throw new ServerError(obj.error.type === "rate_limit_error" ? 429 : 503, obj, null);
        onEvent(obj);
      }
    }
  }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function showError(id, e) { $(id).textContent = e ? (e.message || String(e)) : ""; }

// ------------------------------------------------------------------ sign-in and views
async function signIn(key) {
  state.key = key;
  try {
    state.me = await api("GET", "/v1/me");
  } catch (e) {
    state.key = null;
    sessionStorage.removeItem(KEY_SLOT);
    showError("#login-error", e);
    return;
  }
  sessionStorage.setItem(KEY_SLOT, key);
  showError("#login-error", null);
  const me = state.me;
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  $("#signout").hidden = false;
  $("#who").hidden = false;
  $("#who").textContent = `${me.model} · key “${me.name}” · ${me.scopes.join(", ")}`;
  // Admin-only parts are removed for other keys, not merely hidden.
  if (!me.admin) document.querySelectorAll(".admin-only").forEach((n) => n.remove());
  else document.querySelectorAll(".admin-only").forEach((n) => { if (n.tagName === "BUTTON") n.hidden = false; });
  $("#rag-off").hidden = me.features.rag;
  $("#rag-on").hidden = !me.features.rag;
  const canWrite = me.scopes.includes("rag") || me.admin;
  $("#rag-readonly").hidden = canWrite;
  $("#rag-create").hidden = $("#rag-upload").hidden = !canWrite;
  show("chat");
  $("#chat-input").focus();
}

function signOut() {
  sessionStorage.removeItem(KEY_SLOT);
  location.reload();
}

function show(view) {
  document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== `view-${view}`; });
  document.querySelectorAll("#tabs button").forEach((b) => b.setAttribute("aria-pressed", String(b.dataset.view === view)));
  metrics.active(view === "metrics");
  if (view === "rag" && state.me.features.rag) loadCollections();
  if (view === "quant") loadQuantization();
  if (view === "review") loadReviews();
}

// ------------------------------------------------------------------ chat
function samplingFields() {
  const num = (id) => { const v = $(id).value; return v === "" ? undefined : Number(v); };
  const body = { temperature: num("#c-temperature"), top_p: num("#c-top-p"), max_tokens: num("#c-max-tokens"),
                 seed: num("#c-seed") };
  Object.keys(body).forEach((k) => body[k] === undefined && delete body[k]);
  return body;
}

function bubble(role, text) {
  const node = el("div", { class: `msg ${role}`, text });
  $("#chat-log").append(node);
  return node;
}

async function sendChat(text) {
  showError("#chat-error", null);
  const strategy = $("#c-strategy").value || undefined;
  const messages = [...state.history, { role: "user", content: text }];
  bubble("user", text);
  const out = bubble("assistant", "");
  out.dataset.state = "streaming";
  out.dataset.chunks = "0";
  $("#chat-send").disabled = true;
  $("#chat-stop").disabled = false;
  state.abort = new AbortController();
  let answer = "";
  let note = "";
  let held = false;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", signal: state.abort.signal,
      headers: { Authorization: `Bearer ${state.key}`, "Content-Type": "application/json" },
      body: JSON.stringify({ messages, stream: true, strategy, ...samplingFields() }),
    });
    if (!r.ok) throw new ServerError(r.status, await r.json().catch(() => null), r.headers);
    await readSSE(r, (chunk) => {
      const c = chunk.choices && chunk.choices[0];
      if (!c) return;
      if (c.delta && c.delta.content && !held) {
        answer += c.delta.content;
        out.textContent = answer;
        out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
      }
      const extra = c.servelm || chunk.servelm;
      if (c.finish_reason === "content_filter" || (extra && extra.review_id)) {
        held = true;
        if (extra && extra.review_id) {  // the held notice once, as a note, not also as the answer's text
          answer = "";
          out.textContent = "";
          note = `Held for human review (id ${extra.review_id}); a reviewer decides what you get.`;
        } else note = "The safety filter stopped this answer.";
      } else if (extra && extra.guard && extra.guard.action === "redact") {
        const kinds = extra.guard.redactions.map((x) => `${x.count} ${x.kind.toLowerCase().replace(/_/g, " ")}`);
        note = `The safety filter redacted ${kinds.join(", ")}.`;
      } else if (extra && extra.fallback) {
        note = "The model is unavailable; this is the server's fallback answer.";
      }
    });
    // A held or stopped exchange stays out of the conversation: sent again with the next turn, the flagged
    // message would hold every later turn too.
    if (!held) state.history = [...messages, { role: "assistant", content: answer }];
  } catch (e) {
    if (e.name !== "AbortError") {
      showError("#chat-error", e);
      note = "No answer.";
    } else {
      state.history = [...messages, { role: "assistant", content: answer }];
    }
  } finally {
    out.dataset.state = "done";
    if (note) out.append(el("span", { class: "note", text: note }));
    $("#chat-send").disabled = false;
    $("#chat-stop").disabled = true;
    state.abort = null;
  }
}

// ------------------------------------------------------------------ strategy compare
const STRATEGIES = [["zero_shot", "Zero-shot"], ["few_shot", "Few-shot"], ["chain_of_thought", "Chain-of-thought"]];

async function compare(question) {
  showError("#compare-error", null);
  const grid = $("#compare-grid");
  grid.replaceChildren();
  const messages = [{ role: "user", content: question }];
  const examples = $("#compare-examples").value.split("\n").filter((l) => l.includes("=>"))
    .map((l) => { const [input, output] = l.split("=>"); return { input: input.trim(), output: output.trim() }; });
  await Promise.all(STRATEGIES.map(async ([name, title]) => {
    const req = { messages, strategy: name, ...(name === "few_shot" && examples.length ? { examples } : {}) };
    const prompt = el("pre", { class: "prompt", text: "rendering…" });
    const answer = el("div", { class: "answer", "data-state": "running", text: "generating…" });
    grid.append(el("article", { class: "strategy", "data-strategy": name }, el("h3", { text: title }),
      el("h4", { text: "Prompt" }), prompt, el("h4", { text: "Answer" }), answer));
    try {
      const rendered = await api("POST", "/v1/prompts/render", req);
      prompt.textContent = rendered.prompt;
      const r = await api("POST", "/v1/chat/completions", { ...req, include_reasoning: true, ...samplingFields() });
      const m = r.choices[0].message;
      answer.textContent = m.content || "(empty answer)";
      if (m.reasoning_content) answer.append(el("details", {}, el("summary", { text: "Reasoning" }),
                                                 el("pre", { text: m.reasoning_content })));
      answer.dataset.state = "done";
    } catch (e) {
      answer.textContent = e.message;
      answer.dataset.state = "error";
    }
  }));
}

// ------------------------------------------------------------------ RAG
async function loadCollections(select) {
  try {
    const list = await api("GET", "/v1/collections");
    const sel = $("#rag-collection");
    const keep = select || sel.value;
    sel.replaceChildren(...list.data.map((c) => el("option", { value: c.name,
      text: `${c.name} (${c.num_documents} documents, ${c.num_chunks} chunks)` })));
    if (keep) sel.value = keep;
  } catch (e) { showError("#rag-error", e); }
}

function upload(collection, files) {
  // XHR, not fetch: fetch reports no upload progress.
  return new Promise((resolve, reject) => {
    const form = new FormData();
    for (const f of files) form.append("file", f, f.name);
    const xhr = new XMLHttpRequest();
    const bar = $("#rag-progress");
    bar.value = 0;
    xhr.upload.addEventListener("progress", (ev) => { if (ev.lengthComputable) bar.value = (100 * ev.loaded) / ev.total; });
    xhr.upload.addEventListener("load", () => { bar.value = 100; });
    xhr.addEventListener("load", () => {
      let data = null;
      try { data = JSON.parse(xhr.responseText); } catch (e) { /* not JSON */ }
      if (data && data.data) resolve({ status: xhr.status, data });
      else reject(new ServerError(xhr.status, data, { get: (h) => xhr.getResponseHeader(h) }));
    });
    xhr.addEventListener("error", () => reject(new Error("The upload failed: cannot reach the server.")));
    xhr.open("POST", `/v1/collections/${encodeURIComponent(collection)}/documents`);
    xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
    xhr.send(form);
  });
}

async function askRag(question) {
  const collection = $("#rag-collection").value;
  const answer = $("#rag-answer");
  answer.textContent = "…";
  answer.dataset.state = "running";
  $("#rag-sources").replaceChildren();
  $("#rag-passage").hidden = true;
  try {
    const r = await api("POST", "/v1/rag/query", { collection, query: question, k: 4, ...ragSampling() });
    answer.textContent = r.answer;
    $("#rag-sources").replaceChildren(...r.sources.map((s) => el("li", { "data-chunk": s.chunk_id },
      el("button", { type: "button", onclick: () => openPassage(collection, s),
                     text: `[${s.index}] ${s.source}${s.page != null ? ", page " + s.page : ""}` }),
      " ", el("q", { text: s.snippet }))));
  } catch (e) {
    answer.textContent = "";
    showError("#rag-error", e);
  } finally {
    answer.dataset.state = "done";
  }
}

// The RAG view has its own controls: an answer from documents should be their most likely reading
// (temperature 0), whatever the chat view is set to.
function ragSampling() {
  const num = (id) => { const v = $(id).value; return v === "" ? undefined : Number(v); };
  const body = { max_tokens: num("#r-max-tokens"), temperature: num("#r-temperature") };
  Object.keys(body).forEach((k) => body[k] === undefined && delete body[k]);
  return body;
}

// Shows the cited chunk with the cited sentence (the source's snippet) highlighted.
async function openPassage(collection, source) {
  try {
    const chunk = await api("GET", `/v1/collections/${encodeURIComponent(collection)}/chunks/${source.chunk_id}`);
    const text = chunk.text;
    const at = text.indexOf(source.snippet);
    const box = $("#rag-passage-text");
    if (at < 0) box.replaceChildren(el("mark", { text }));
    else box.replaceChildren(text.slice(0, at), el("mark", { text: source.snippet }), text.slice(at + source.snippet.length));
    $("#rag-passage-title").textContent =
      `[${source.index}] ${chunk.source}${chunk.page != null ? ", page " + chunk.page : ""}, characters ${chunk.start}–${chunk.end}`;
    $("#rag-passage").hidden = false;
  } catch (e) { showError("#rag-error", e); }
}

// ------------------------------------------------------------------ quantization calculator
function updateCalculator() {
  const params = Number($("#q-params").value) || 0;  // billions
  const bits = Number($("#q-bits").value);
  const gb = (params * 1e9 * bits) / 8 / 1e9;  // the seed's formula: params × bits / 8 bytes
  $("#q-bits-out").textContent = String(bits);
  $("#q-gb").textContent = `${gb.toFixed(2)} GB`;
  $("#q-bar-fill").style.width = `${(100 * bits) / 32}%`;
}

async function loadQuantization() {
  if (state.quant) return;
  // the figures take a few seconds on first use (the model's shapes are read from its files)
  $("#q-table").setAttribute("aria-busy", "true");
  $("#q-table tbody").replaceChildren(el("tr", { class: "loading" }, el("td", { colspan: "4", text: "Loading…" })));
  try {
    const q = (state.quant = await api("GET", "/v1/quantization"));
    $("#q-model").textContent = `${q.model}: ${(q.params / 1e6).toFixed(1)}M parameters` +
      (q.source_qtype ? ` (file stores ${q.source_qtype})` : "");
    $("#q-table tbody").replaceChildren(...Object.entries(q.formats).map(([fmt, v]) => el("tr", { "data-format": fmt },
      el("td", { text: fmt.toUpperCase() }), el("td", { text: v.group_size || "–" }),
      el("td", { text: `${(v.computed_bytes / 1e6).toFixed(1)} MB` }),
      // the projections' stored bits per weight, scales included: the figure `servelm quantize --report` prints
      el("td", { text: v.projection_bits_per_weight.toFixed(3) }))));
    $("#q-table").setAttribute("aria-busy", "false");
    const l = q.loaded;
    $("#q-loaded").textContent = `Loaded now: ${l.quantization ? l.quantization.toUpperCase() + " weights, " : ""}` +
      `${l.dtype} compute, measured ${(l.measured_bytes / 1e6).toFixed(1)} MB of weights in memory.`;
  } catch (e) {
    $("#q-table tbody").replaceChildren();
    $("#q-table").setAttribute("aria-busy", "false");
    showError("#q-error", e);
  }
}

// ------------------------------------------------------------------ live metrics
// Parses the Prometheus text format: {"name{labels}": value}.
function parseProm(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const cut = line.lastIndexOf(" ");
    out[line.slice(0, cut)] = Number(line.slice(cut + 1));
  }
  return out;
}

const metrics = (() => {
  const INTERVAL_MS = 2000;
  const KEEP = 90;  // points per chart (3 minutes)
  const CHARTS = [
    ["throughput", "Throughput", "tokens/s"], ["ttft", "Time to first token", "ms"],
    ["itl", "Inter-token latency", "ms"], ["kv", "KV-cache usage", "%"], ["queue", "Queue depth", "requests"],
  ];
  const series = { t: [] };
  const charts = {};
  let prev = null;
  let timer = null;

  function meanOver(cur, name) {  // mean of a histogram over the last interval, null when nothing finished
    const n = cur[`${name}_count`] - prev[`${name}_count`];
    return n > 0 ? (1000 * (cur[`${name}_sum`] - prev[`${name}_sum`])) / n : null;
  }

  function build() {
    const box = $("#m-charts");
    for (const [id, title, unit] of CHARTS) {
      series[id] = [];
      const value = el("output", { id: `m-${id}-value`, text: "–" });
      const plot = el("div", { class: "plot" });
      box.append(el("div", { class: "chart", id: `m-${id}`, "data-points": "0" }, el("h3", {}, title, value), plot));
      if (window.uPlot) {
        charts[id] = new uPlot({ width: Math.max(plot.clientWidth, 240), height: 160, legend: { show: false },
          series: [{}, { label: `${title} (${unit})`, stroke: "#3b82f6", width: 2, spanGaps: false }],
          axes: [{}, { size: 50 }], scales: { x: { time: true } } }, [[], []], plot);
      }
      charts[id + "Unit"] = unit;
    }
    window.addEventListener("resize", () => {
      for (const [id] of CHARTS) {
        const plot = document.querySelector(`#m-${id} .plot`);
        if (charts[id] && plot.clientWidth) charts[id].setSize({ width: plot.clientWidth, height: 160 });
      }
    });
  }

  async function poll() {
    try {
      const r = await fetch("/metrics", { headers: { Authorization: `Bearer ${state.key}` } });
      if (!r.ok) throw new ServerError(r.status, null, r.headers);
      const cur = parseProm(await r.text());
      const now = Date.now() / 1000;
      // Rates and interval means need a previous reading; the gauges show from the first one.
      const dt = prev ? now - prev.__t : 0;
      const point = {
        throughput: prev ? (cur["servelm:generation_tokens_total"] - prev["servelm:generation_tokens_total"]) / dt : null,
        ttft: prev ? meanOver(cur, "servelm:time_to_first_token_seconds") : null,
        itl: prev ? meanOver(cur, "servelm:inter_token_latency_seconds") : null,
        kv: 100 * (cur["servelm:kv_cache_usage_perc"] || 0),
        queue: (cur["servelm:num_requests_waiting"] || 0),
      };
      series.t.push(now);
      for (const [id, , unit] of CHARTS) {
        series[id].push(point[id]);
        const node = $(`#m-${id}`);
        node.dataset.points = String(series[id].length);
        if (point[id] != null) {
          node.dataset.last = String(point[id]);
          $(`#m-${id}-value`).textContent = `${point[id].toFixed(unit === "ms" ? 0 : 1)} ${unit}`;
        }
        if (series[id].length > KEEP) series[id].shift();
        if (charts[id]) charts[id].setData([series.t, series[id]]);
      }
      if (series.t.length > KEEP) series.t.shift();
      $("#m-charts").dataset.tokens = String(cur["servelm:generation_tokens_total"]);
      cur.__t = now;
      prev = cur;
      showError("#m-error", null);
    } catch (e) { showError("#m-error", e); }
  }

  return {
    active(on) {
      if (on && !timer) {
        if (!Object.keys(charts).length) build();
        $("#m-interval").textContent = String(INTERVAL_MS / 1000);
        poll();
        timer = setInterval(poll, INTERVAL_MS);
      } else if (!on && timer) {
        clearInterval(timer);
        timer = null;
        prev = null;  // a gap while hidden is not one long interval
      }
    },
  };
})();

// ------------------------------------------------------------------ review queue (admin)
async function loadReviews() {
  if (!state.me.admin) return;
  showError("#review-error", null);
  try {
    const r = await api("GET", "/v1/admin/reviews?status=pending");
    showReviewCount(r.pending);
    $("#review-list").replaceChildren(...r.data.map(reviewCard));
  } catch (e) {
    if (e.code === "review_disabled") $("#review-off").hidden = false;
    else showError("#review-error", e);
  }
}

function showReviewCount(n) {
  $("#review-count").textContent = `${n} pending`;
  $("#review-count").dataset.pending = String(n);
}

async function refreshReviewCount() {
  try { showReviewCount((await api("GET", "/v1/admin/reviews?status=pending&limit=1")).pending); } catch (e) { /* the list says it */ }
}

function reviewCard(item) {
  const edit = el("textarea", { rows: "3", "aria-label": "Answer to release" });
  edit.value = item.final_text || item.response || "";
  const status = el("p", { class: "status", text: item.status });
  const act = (path, body) => async () => {
    try {
      const done = await api("POST", `/v1/admin/reviews/${item.id}/${path}`, body && body());
      status.textContent = done.status === "pending" ? "edited (still pending)" : done.status;
      card.dataset.status = done.status;
      if (done.status !== "pending") {
        card.querySelectorAll("button").forEach((b) => { b.disabled = true; });
        await refreshReviewCount();
      }
    } catch (e) { status.textContent = e.message; }
  };
  const card = el("article", { class: "review", "data-review-id": item.id, "data-status": item.status },
    el("dl", {},
      el("dt", { text: "Flagged" }), el("dd", { text: `${item.stage} · ${item.scanner}` }),
      el("dt", { text: "Reason" }), el("dd", { class: "reason", text: item.reason }),
      el("dt", { text: "Key" }), el("dd", { text: item.api_key_id || "–" }),
      el("dt", { text: "Prompt" }), el("dd", { text: item.prompt || "–" }),
      el("dt", { text: "Held answer" }), el("dd", { text: item.response || "–" })),
    el("label", { text: "Answer to release (edit before approving, or leave as is)" }), edit,
    el("div", { class: "row" },
      el("button", { type: "button", class: "approve", text: "Approve", onclick: act("approve", () => ({ text: edit.value || null })) }),
      el("button", { type: "button", class: "reject", text: "Reject", onclick: act("reject") }),
      el("button", { type: "button", class: "save-edit", text: "Save edit", onclick: act("edit", () => ({ text: edit.value })) })),
    status);
  return card;
}

// ------------------------------------------------------------------ wiring
function wire() {
  $("#login-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("#key").value.trim()); });
  $("#signout").addEventListener("click", signOut);
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => show(b.dataset.view)));

  $("#chat-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("#chat-input").value.trim();
    if (!text || state.abort) return;
    $("#chat-input").value = "";
    sendChat(text);
  });
  $("#chat-input").addEventListener("keydown", (ev) => {  // Enter sends, Shift+Enter is a new line
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  $("#chat-stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("#chat-clear").addEventListener("click", () => { state.history = []; $("#chat-log").replaceChildren(); });

  $("#compare-form").addEventListener("submit", (ev) => { ev.preventDefault(); compare($("#compare-input").value.trim()); });

  $("#rag-create").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError("#rag-error", null);
    try {
      const c = await api("POST", "/v1/collections", { name: $("#rag-new").value.trim() });
      $("#rag-new").value = "";
      await loadCollections(c.name);
    } catch (e) { showError("#rag-error", e); }
  });
  $("#rag-upload").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    showError("#rag-error", null);
    const list = $("#rag-upload-results");
    list.replaceChildren();
    try {
      const r = await upload($("#rag-collection").value, $("#rag-files").files);
      list.replaceChildren(...r.data.data.map((d) => el("li", { "data-status": d.status,
        text: d.status === "error" ? `${d.source}: ${d.error.message}` : `${d.source}: ${d.status}, ${d.chunks} chunks` })));
      await loadCollections();
    } catch (e) { showError("#rag-error", e); }
  });
  $("#rag-ask").addEventListener("submit", (ev) => { ev.preventDefault(); askRag($("#rag-question").value.trim()); });

  $("#q-bits").addEventListener("input", updateCalculator);
  $("#q-params").addEventListener("input", updateCalculator);
  document.querySelectorAll("#q-presets button").forEach((b) => b.addEventListener("click", () => {
    $("#q-bits").value = b.dataset.bits;
    updateCalculator();
  }));
  updateCalculator();

  $("#review-refresh").addEventListener("click", loadReviews);
  if (state.key) signIn(state.key);
}

wire();

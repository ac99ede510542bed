// The Tandem edge's chat page: streams answers over /v1/chat/completions (SSE), keeps the conversation
// in the page, colours each token by where it came from, and shows the cloud link's live state.
"use strict";

const $ = (id) => document.getElementById(id);
const SOURCES = { draft: "accepted draft", target: "target token", edge: "edge only" };
const KEY_STORE = "tandem-api-key";
let history = [];            // the conversation: {role, content}
let controller = null;       // aborts the answer in flight

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function fmt(x, digits) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
}

// ---- the link's live state: /health every second (open even when the edge has API keys) ----
async function pollHealth() {
  try {
    const r = await fetch("/health", { cache: "no-store" });
    const h = await r.json();
    const cloud = h.cloud || {};
    const state = $("cloud-state");
    state.textContent = cloud.up ? "up" : (cloud.status || "down");
    state.className = cloud.up ? "up" : "down";
    $("rtt").textContent = fmt(cloud.rtt_ms, 1);
    $("health").textContent = fmt(cloud.health_factor, 2);
    $("transport").textContent = cloud.transport || "–";
    $("sessions").textContent = h.active_sessions ?? "–";
    $("queued").textContent = h.queue_depth ?? "–";
    document.body.dataset.edge = h.status;
  } catch (e) {
    $("cloud-state").textContent = "edge unreachable";
    $("cloud-state").className = "down";
  }
}

// ---- the conversation ----
function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  div.appendChild(body);
  $("chat").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function appendTokens(body, chunkText, tandem) {
  let shown = "";
  if (tandem && Array.isArray(tandem.texts)) {
    tandem.texts.forEach((text, i) => {
      const source = tandem.sources[i];
      const span = document.createElement("span");
      span.className = "tok tok-" + source;
      span.title = (SOURCES[source] || source) + " · token " + tandem.token_ids[i];
      span.textContent = text;
      body.appendChild(span);
      shown += text;
    });
  }
  if (chunkText.length > shown.length) {       // text without a token of its own (a final UTF-8 flush)
    body.appendChild(document.createTextNode(chunkText.slice(shown.length)));
  }
}

function figures(t, usage) {
  if (!t) return "";
  const by = t.tokens_by_source || {};
  const parts = [t.mode, (usage ? usage.completion_tokens : t.tokens) + " tokens"];
  if (t.rounds) parts.push(t.rounds + " rounds", "τ " + fmt(t.mean_accepted_length, 2));
  parts.push("draft " + (by.draft || 0) + " · target " + (by.target || 0) + " · edge " + (by.edge || 0));
  if (t.ttft_ms != null) parts.push("TTFT " + fmt(t.ttft_ms, 0) + " ms");
  if (t.tokens_per_s != null) parts.push(fmt(t.tokens_per_s, 1) + " tok/s");
  if (t.rtt_ms != null) parts.push("RTT " + fmt(t.rtt_ms, 1) + " ms");
  if (t.fallbacks) parts.push(t.fallbacks + " fallback(s) to edge-only");
  return parts.join(" · ");
}

function showError(msg, text) {
  const e = document.createElement("div");
  e.className = "error";
  e.textContent = text;
  msg.appendChild(e);
}

// One SSE event ("data: ..." lines) -> true at [DONE].
function handleEvent(raw, msg, st) {
  const data = raw.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, "")).join("\n");
  if (!data) return false;
  if (data === "[DONE]") return true;
  const chunk = JSON.parse(data);
  st.chunks += 1;
  msg.dataset.chunks = String(st.chunks);
  const choice = (chunk.choices || [])[0];
  if (choice) {
    const text = (choice.delta && choice.delta.content) || "";
    if (text || (chunk.tandem && chunk.tandem.texts)) appendTokens(msg.querySelector(".body"), text, chunk.tandem);
    st.answer += text;
    if (choice.finish_reason) {
      st.finish = choice.finish_reason;
      st.tandem = chunk.tandem;
    }
  }
  if (chunk.usage) st.usage = chunk.usage;
  if (chunk.error) {
    st.error = chunk.error.message;
    showError(msg, "The answer stopped: " + chunk.error.message);
  }
  return false;
}

async function ask(question) {
  const convo = history;                       // "Clear" while answering starts a new conversation
  convo.push({ role: "user", content: question });
  addMessage("user", question);
  const msg = addMessage("assistant", "");
  const st = { chunks: 0, answer: "", finish: null, tandem: null, usage: null, error: null };
  controller = new AbortController();
  setBusy(true);
  const request = {
    messages: convo, stream: true, stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 256, temperature: Number($("temperature").value) || 0,
  };
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: controller.signal,
    });
    if (!r.ok) {
      const body = await r.json().catch(() => null);
      throw new Error((body && body.error && body.error.message) || "HTTP " + r.status);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", done = false;
    while (!done) {
      const { value, done: end } = await reader.read();
      if (end) break;
      buf += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let i;
      while (!done && (i = buf.indexOf("\n\n")) >= 0) {
        done = handleEvent(buf.slice(0, i), msg, st);
        buf = buf.slice(i + 2);
      }
    }
  } catch (e) {
    st.error = st.error || (e.name === "AbortError" ? "stopped" : String(e.message || e));
    if (e.name !== "AbortError") showError(msg, st.error);
  } finally {
    if (st.answer) convo.push({ role: "assistant", content: st.answer });
    else convo.pop();                         // nothing answered: the question can be asked again
    const f = document.createElement("div");
    f.className = "figures";
    f.textContent = figures(st.tandem, st.usage) + (st.finish ? " · finish: " + st.finish : "");
    msg.appendChild(f);
    msg.dataset.finish = st.finish || (st.error ? "error" : "");
    msg.dataset.done = "1";
    controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = busy ? "answering…" : "";
}

$("ask").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("question").value.trim();
  if (!q || controller) return;
  $("question").value = "";
  ask(q);
});
$("question").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("ask").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history = [];
  $("chat").textContent = "";
});
$("api-key").value = localStorage.getItem(KEY_STORE) || "";
$("api-key").addEventListener("change", () => localStorage.setItem(KEY_STORE, $("api-key").value.trim()));
setBusy(false);
pollHealth();
setInterval(pollHealth, 1000);

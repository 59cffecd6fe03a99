// The chat page of `tiblocal serve`: plain JavaScript, no build step, nothing loaded from the network but this server.
// It streams answers from /v1/chat/completions (server-sent events) and keeps the conversation in the page
// (and in localStorage, so a reload keeps it).
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "tiblocal-chat";
// A Tibetan syllable: a run of letters, subjoined letters and vowel signs (U+0F40-U+0FBC), as tiblocal.text counts.
const SYLLABLE = /[\u0F40-\u0FBC]+/g;

const state = {
  messages: [],        // {role, content} of the conversation, without the system prompt
  stats: [],           // per assistant message: its stats line
  tasks: [],
  controller: null,    // the AbortController of the answer in flight
  model: null,
};

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    state.messages = Array.isArray(saved.messages) ? saved.messages : [];
    state.stats = Array.isArray(saved.stats) ? saved.stats : [];
    for (const id of ["system", "temperature", "max-tokens", "task", "api-key"]) {
      if (saved[id] !== undefined) $(id).value = saved[id];
    }
  } catch (e) { state.messages = []; }
}

function save() {
  const saved = { messages: state.messages, stats: state.stats };
  for (const id of ["system", "temperature", "max-tokens", "task", "api-key"]) saved[id] = $(id).value;
  localStorage.setItem(STORE, JSON.stringify(saved));
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function statsLine(text) {
  const div = document.createElement("div");
  div.className = "stats";
  div.textContent = text;
  $("log").appendChild(div);
  return div;
}

function render() {
  $("log").textContent = "";
  let a = 0;
  for (const m of state.messages) {
    bubble(m.role, m.content);
    if (m.role === "assistant" && state.stats[a]) statsLine(state.stats[a]);
    if (m.role === "assistant") a++;
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function wrapInTask(text) {
  const task = state.tasks.find((t) => t.name === $("task").value);
  return task ? task.pattern.split("{text}").join(text) : text;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + response.status;
}

async function send(text) {
  const content = wrapInTask(text);
  state.messages.push({ role: "user", content });
  bubble("user", content);
  const system = $("system").value.trim();
  const body = {
    model: state.model,
    messages: (system ? [{ role: "system", content: system }] : []).concat(state.messages),
    stream: true,
    stream_options: { include_usage: true },
  };
  const temp = parseFloat($("temperature").value);
  if (Number.isFinite(temp)) body.temperature = temp;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;

  const out = bubble("assistant", "");
  let answer = "";
  let timings = null;
  let usage = null;
  const started = performance.now();
  let firstAt = null;
  state.controller = new AbortController();
  busy(true);
  $("status").textContent = "answering…";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.timings) timings = chunk.timings;
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (firstAt === null) firstAt = performance.now();
            answer += delta.content;
            out.textContent = answer;
            out.scrollIntoView({ block: "end" });
          }
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      out.remove();
      state.messages.pop();
      bubble("error", String(e.message || e));
      $("status").textContent = "";
      finish();
      return;
    }
  }
  state.messages.push({ role: "assistant", content: answer });
  const line = describe(answer, timings, usage, started, firstAt, state.controller.signal.aborted);
  state.stats.push(line);
  statsLine(line);
  $("status").textContent = "";
  finish();
}

function describe(answer, timings, usage, started, firstAt, stopped) {
  const syllables = (answer.match(SYLLABLE) || []).length;
  let tokens = usage ? usage.completion_tokens : null;
  let seconds = null;
  if (timings && timings.predicted_ms > 0) {
    tokens = timings.predicted_n;
    seconds = timings.predicted_ms / 1000;
  } else if (firstAt !== null) {
    seconds = (performance.now() - firstAt) / 1000;
  }
  const parts = [];
  if (tokens !== null) parts.push(tokens + " tokens");
  if (seconds) {
    if (tokens !== null) parts.push((tokens / seconds).toFixed(1) + " tokens/s");
    parts.push((syllables / seconds).toFixed(1) + " syllables/s");
  }
  if (timings && timings.first_token_ms !== undefined) parts.push("first token " + (timings.first_token_ms / 1000).toFixed(2) + " s");
  else if (firstAt !== null) parts.push("first token " + ((firstAt - started) / 1000).toFixed(2) + " s");
  if (stopped) parts.push("stopped");
  return parts.join(" · ");
}

function finish() {
  state.controller = null;
  busy(false);
  save();
  $("input").focus();
}

async function init() {
  load();
  render();
  try {
    const response = await fetch("/props");
    const props = await response.json();
    state.model = props.model;
    state.tasks = props.tasks || [];
    $("model").textContent = props.model + " · context " + props.n_ctx + " · " + props.parallel + " slots · template " + props.template;
    for (const t of state.tasks) {
      const opt = document.createElement("option");
      opt.value = t.name;
      opt.textContent = t.name + ": " + t.description;
      $("task").appendChild(opt);
    }
    const saved = JSON.parse(localStorage.getItem(STORE) || "{}");
    if (saved.task) $("task").value = saved.task;
    const d = props.default_generation_settings || {};
    if ($("temperature").value === "" && d.temperature !== undefined) $("temperature").value = d.temperature;
    if ($("max-tokens").value === "" && d.max_tokens !== undefined) $("max-tokens").value = d.max_tokens;
    for (const el of document.querySelectorAll(".key-row")) el.hidden = !props.api_key_required;
  } catch (e) {
    $("model").textContent = "the server did not answer: " + e.message;
  }
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });

$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  state.stats = [];
  render();
  save();
  $("input").focus();
});

for (const id of ["system", "temperature", "max-tokens", "task", "api-key"]) $(id).addEventListener("change", save);

init();

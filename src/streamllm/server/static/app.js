// The streamllm chat page. It is a client of the server's OpenAI endpoints like any other: replies stream from
// POST /v1/chat/completions, and a session is continued by sending only the new message with X-Session-Id.
// The server keeps each session's cache; this browser keeps the text of its conversations (localStorage), so
// that a reload shows them again. Model text is only ever set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = {
  key: "streamllm.key",             // the API key, only when "remember" is ticked
  current: "streamllm.current",     // the session shown last
  chat: (id) => `streamllm.chat.${id}`, // [{role, content, recalls?}] of one session
};

const state = {
  key: "",
  model: null,
  sessionId: null,
  sessions: [],
  running: null, // the AbortController of the reply in flight
  errorSource: null,
};

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// -- talking to the server -------------------------------------------------------------------------------------
function headers(extra = {}) {
  const h = { ...extra };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function errorFrom(response) {
  let message = `${response.status} ${response.statusText}`;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message, code);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

// Server-sent events: yields the data of each event as a string.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

function plainWords(err) {
  if (err instanceof ApiError) {
    if (err.status === 401) return "The server did not accept the API key. Enter its key at the top of the page.";
    if (err.code === "session_not_found") return "This session no longer exists on the server. Start a new chat.";
    if (err.code === "session_state_unusable") return `This session cannot be used any more: ${err.message}`;
    if (err.status === 429 || err.status === 503) return `The server is busy: ${err.message}`;
    return err.message;
  }
  if (err instanceof TypeError) return "The server cannot be reached. Is it still running?";
  return String(err.message || err);
}

// -- what is on the page -----------------------------------------------------------------------------------------
// An error stays on the page until what caused it works again: `source` says what showed it ("key", "turn").
function showError(err, source = "turn") {
  if (!err && source !== state.errorSource) return;
  state.errorSource = err ? source : null;
  $("error").textContent = err ? plainWords(err) : "";
  $("error").hidden = !err;
}

function showNotice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function transcript(id) {
  try {
    return JSON.parse(localStorage.getItem(STORE.chat(id)) || "[]");
  } catch (_) {
    return [];
  }
}

function saveTranscript(id, messages) {
  localStorage.setItem(STORE.chat(id), JSON.stringify(messages));
}

function showTranscript() {
  $("messages").replaceChildren();
  if (!state.sessionId) return;
  const messages = transcript(state.sessionId);
  const info = state.sessions.find((s) => s.id === state.sessionId);
  const told = messages.filter((m) => m.role === "user").length;
  if (info && info.turns > told) {
    const note = addMessage("note", `${info.turns - told} earlier turn(s) of this session are in its cache, ` +
      "but their text was not kept in this browser.");
    note.setAttribute("data-note", "missing");
  }
  for (const m of messages) {
    const li = addMessage(m.role, m.content);
    if (m.recalls) showRecalls(li, m.recalls);
  }
}

function number(n) {
  return n === null || n === undefined ? "-" : n.toLocaleString("en-US");
}

function plural(n, word) {
  return n === null || n === undefined ? `? ${word}s` : `${number(n)} ${word}${n === 1 ? "" : "s"}`;
}

function showStats(info) {
  const bar = $("cache-bar");
  if (!info || info.cache_length === null || info.cache_length === undefined) {
    bar.querySelector(".sinks").style.width = "0";
    bar.querySelector(".window").style.width = "0";
    bar.setAttribute("aria-valuenow", "0");
    bar.dataset.full = "false";
    $("stat-cache").textContent = info && info.tokens_seen !== null ? "on disk; loads with the next turn" : "-";
    $("stat-seen").textContent = number(info && info.tokens_seen);
    $("stat-evicted").textContent = "-";
    showMemory(info);
    return;
  }
  const { size, num_sinks: sinks, window } = info.cache;
  const held = info.cache_length;
  const sinkPart = Math.min(held, sinks);
  bar.querySelector(".sinks").style.width = `${(100 * sinkPart) / size}%`;
  bar.querySelector(".window").style.width = `${(100 * (held - sinkPart)) / size}%`;
  bar.setAttribute("aria-valuemax", String(size));
  bar.setAttribute("aria-valuenow", String(held));
  bar.dataset.full = String(held >= size);
  bar.title = `${sinks} attention sinks + a window of ${window} recent tokens`;
  $("stat-cache").textContent = `${number(held)} / ${number(size)} (${sinks} sinks + ${window} window)`;
  $("stat-seen").textContent = number(info.tokens_seen);
  $("stat-evicted").textContent = number(info.evicted);
  showMemory(info);
}

function showSessions() {
  const list = $("sessions");
  list.replaceChildren();
  for (const s of state.sessions) {
    const li = document.createElement("li");
    if (s.id === state.sessionId) li.className = "current";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    const first = transcript(s.id).find((m) => m.role === "user");
    open.textContent = first ? first.content.slice(0, 60) : `session ${s.id.slice(0, 8)}`;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = s.error ? "unusable" : `${plural(s.turns, "turn")}, ${plural(s.tokens_seen, "token")}`;
    open.append(meta);
    open.addEventListener("click", () => openSession(s.id));
    const del = document.createElement("button");
    del.type = "button";
    del.className = "delete";
    del.textContent = "\u00d7";
    del.setAttribute("aria-label", "Delete this session");
    del.addEventListener("click", () => deleteSession(s.id));
    li.append(open, del);
    list.append(li);
  }
}

function setRunning(controller) {
  state.running = controller;
  $("send").textContent = controller ? "Stop" : "Send";
  $("send").classList.toggle("secondary", Boolean(controller));
}

// -- sessions ----------------------------------------------------------------------------------------------------
async function refreshSessions() {
  try {
    state.sessions = (await api("/v1/sessions")).data;
    showError(null, "key");
  } catch (err) {
    state.sessions = [];
    showError(err, "key");
  }
  showSessions();
}

// Shows the session's counters; returns them (null when there is no session or they could not be read).
async function refreshStats() {
  if (!state.sessionId) return showStats(null);
  try {
    const info = await api(`/v1/sessions/${encodeURIComponent(state.sessionId)}`);
    showStats(info);
    return info;
  } catch (err) {
    if (!state.running) showError(err, "key");
    return null;
  }
}

function openSession(id) {
  if (state.running) return;
  state.sessionId = id;
  if (id) localStorage.setItem(STORE.current, id);
  else localStorage.removeItem(STORE.current);
  $("stat-rate").textContent = "-";
  $("stat-ttft").textContent = "-";
  showError(null, "turn");
  showNotice(null);
  showTranscript();
  showSessions();
  refreshStats();
  $("input").focus();
}

async function deleteSession(id) {
  if (state.running) return;
  try {
    await api(`/v1/sessions/${encodeURIComponent(id)}`, { method: "DELETE" });
  } catch (err) {
    if (!(err instanceof ApiError && err.code === "session_not_found")) return showError(err);
  }
  localStorage.removeItem(STORE.chat(id));
  if (id === state.sessionId) openSession(null);
  await refreshSessions();
}

// -- one turn ----------------------------------------------------------------------------------------------------
function requestBody(text) {
  const body = {
    model: state.model,
    messages: [{ role: "user", content: text }],
    stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  if ($("stop").value) body.stop = [$("stop").value];
  return body;
}

async function send(text) {
  showError(null, "turn");
  showNotice(null);
  const controller = new AbortController();
  setRunning(controller);
  const asked = addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  const extra = { "Content-Type": "application/json" };
  if (state.sessionId) extra["X-Session-Id"] = state.sessionId;
  const started = performance.now();
  let first = null, last = null, pieces = 0, usage = null, content = "";
  const poll = setInterval(refreshStats, 1000);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(extra), body: JSON.stringify(requestBody(text)), signal: controller.signal,
    });
    if (!response.ok) throw await errorFrom(response);
    const id = response.headers.get("X-Session-Id");
    if (id && id !== state.sessionId) {
      state.sessionId = id;
      localStorage.setItem(STORE.current, id);
    }
    let finished = false;
    for await (const data of events(response)) {
      if (data === "[DONE]") {
        finished = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.status || 500, chunk.error.message, chunk.error.code);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta && chunk.choices[0].delta.content;
      if (!delta) continue;
      last = performance.now();
      if (first === null) {
        first = last;
        $("stat-ttft").textContent = `${Math.round(first - started)} ms`;
      }
      pieces += 1;
      content += delta;
      reply.textContent = content;
      reply.scrollIntoView({ block: "end" });
    }
    // The server sends [DONE] only once the turn is saved; without it the turn did not happen.
    if (!finished) throw new Error("The connection closed before the reply was complete. Send the message again.");
    const tokens = usage ? usage.completion_tokens : pieces;
    if (first !== null && last > first && tokens > 1) {
      $("stat-rate").textContent = ((1000 * (tokens - 1)) / (last - first)).toFixed(1);
    }
    // What this reply recalled: the session holds it until its next turn, which this page has not sent yet.
    const info = await refreshStats();
    const recalls = info && info.memory ? info.memory.last_recalls : undefined;
    showRecalls(reply, recalls);
    const messages = transcript(state.sessionId);
    messages.push({ role: "user", content: text }, { role: "assistant", content, recalls });
    saveTranscript(state.sessionId, messages);
  } catch (err) {
    // The server undoes a turn that did not finish, so the page does too: the message goes back in the box.
    asked.remove();
    reply.remove();
    if (!$("input").value) $("input").value = text;
    if (err.name === "AbortError") showNotice("Stopped. The server undid this turn; your message is back in the box.");
    else showError(err);
  } finally {
    clearInterval(poll);
    reply.classList.remove("streaming");
    setRunning(null);
  }
  await refreshSessions();
  await refreshStats();
}

// -- wiring ------------------------------------------------------------------------------------------------------
function setKey() {
  state.key = $("key").value.trim();
  if ($("remember").checked && state.key) localStorage.setItem(STORE.key, state.key);
  else localStorage.removeItem(STORE.key);
  refreshSessions().then(() => openSession(state.sessionId));
}

function submit() {
  if (state.running) {
    state.running.abort();
    return;
  }
  const text = $("input").value;
  if (!text.trim()) return;
  $("input").value = "";
  send(text);
}

async function start() {
  const remembered = localStorage.getItem(STORE.key);
  if (remembered) {
    state.key = remembered;
    $("key").value = remembered;
    $("remember").checked = true;
  }
  $("key").addEventListener("change", setKey);
  $("remember").addEventListener("change", setKey);
  $("new-session").addEventListener("click", () => openSession(null));
  $("key-box").addEventListener("submit", (e) => e.preventDefault());
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    } else if (e.key === "Escape" && state.running) {
      state.running.abort();
    }
  });
  try {
    const health = await (await fetch("/health")).json();
    state.model = health.model;
    $("model").textContent = health.model;
  } catch (err) {
    showError(err);
  }
  await refreshSessions();
  const current = localStorage.getItem(STORE.current);
  // Without the key the list is unknown: show the last conversation anyway; entering the key continues it.
  const listed = state.sessions.some((s) => s.id === current);
  openSession(current && (listed || state.errorSource === "key") ? current : null);
}

document.addEventListener("DOMContentLoaded", start);

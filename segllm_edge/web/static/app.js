// SegLLM web demo: one conversation per browser tab, talking to the JSON API in segllm_edge/web/app.py.
"use strict";

const $ = (id) => document.getElementById(id);
const STAGE_COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
                      "#ff9da7", "#9c755f", "#bab0ac", "#555555"];
const REF_SUFFIX = /\[REF:\s*([0-9][0-9,\s]*)\]\s*$/i;

const state = { info: null, conv: null, rounds: [], busy: false };

// ---------------------------------------------------------------- talking to the server
class ApiError extends Error {
  constructor(message, kind, status) { super(message); this.kind = kind; this.status = status; }
}

async function api(method, url, body, headers) {
  let res;
  try {
    res = await fetch(url, { method, body, headers });
  } catch (e) {
    throw new ApiError("The demo server is not answering (it may have stopped or restarted). " +
                       "Reload the page once it is back.", "ServerGone", 0);
  }
  let data = null;
  try { data = await res.json(); } catch (e) { /* not JSON */ }
  if (!res.ok) {
    const msg = data && data.error ? data.error : `the server answered ${res.status} ${res.statusText}`;
    throw new ApiError(msg, data && data.kind ? data.kind : "HTTPError", res.status);
  }
  return data;
}

// ---------------------------------------------------------------- errors
function showError(err) {
  let text = err instanceof ApiError ? err.message : String(err && err.message ? err.message : err);
  const kind = err instanceof ApiError ? err.kind : "Error";
  if ((kind === "SessionError" && state.conv && err.status === 404) || kind === "ContextOverflowError") {
    text += "\n(Use “New conversation” to start again.)";
  }
  $("error-text").textContent = text;
  $("error").dataset.kind = kind;
  $("error").hidden = false;
}

function clearError() { $("error").hidden = true; $("error-text").textContent = ""; }

// ---------------------------------------------------------------- conversation
async function startConversation(file) {
  clearError();
  const limit = state.info ? state.info.max_upload_bytes : 0;
  if (file && limit && file.size > limit) {   // the server refuses it too; this spares the upload
    showError(`'${file.name}' is ${(file.size / 2 ** 20).toFixed(1)} MiB, over the limit of ` +
              `${Math.round(limit / 2 ** 20)} MiB`);
    $("file-input").value = "";
    return;
  }
  setBusy(true);
  try {
    const conv = file
      ? await api("POST", "/api/conversations", file, { "X-Filename": encodeURIComponent(file.name || "upload") })
      : await api("POST", "/api/conversations?bundled=1");
    if (state.conv) endConversation(true);
    showConversation(conv);
    if (!file) showSuggestions(state.info ? state.info.demo_questions : []);
  } catch (e) {
    showError(e);
  } finally {
    setBusy(false);
    $("file-input").value = "";
  }
}

function showConversation(conv) {
  state.conv = conv;
  state.rounds = [];
  sessionStorage.setItem("segllm-conversation", conv.id);
  $("rounds").innerHTML = "";
  $("layers").innerHTML = "";
  $("base").src = conv.image;
  $("start").hidden = true;
  $("stage").hidden = false;
  $("stage-hint").hidden = false;
  const base = `/api/conversations/${conv.id}`;
  $("dl-masks").href = `${base}/masks.zip`;
  $("dl-overlay").href = `${base}/overlay.png`;
  $("dl-json").href = `${base}/conversation.json`;
  for (const r of conv.rounds) addRound(r);
  renderCharts();
  updateEmpty();
  $("question").focus();
}

function endConversation(quiet) {
  const conv = state.conv;
  state.conv = null;
  state.rounds = [];
  sessionStorage.removeItem("segllm-conversation");
  if (conv) api("DELETE", `/api/conversations/${conv.id}`).catch(() => {});
  if (quiet) return;
  clearError();
  $("rounds").innerHTML = "";
  $("layers").innerHTML = "";
  $("base").removeAttribute("src");
  $("stage").hidden = true;
  $("stage-hint").hidden = true;
  $("start").hidden = false;
  $("suggestions").innerHTML = "";
  $("question").value = "";
  $("stage-legend").innerHTML = "";
  setBusy(false);
  updateEmpty();
}

async function ask(question) {
  if (!state.conv || state.busy) return;
  clearError();
  const k = state.rounds.length + 1;
  const pending = document.createElement("li");
  pending.className = "round pending";
  pending.innerHTML = `<span class="spinner"></span>Round ${k}: <span class="q"></span> — running…`;
  pending.querySelector(".q").textContent = question;
  $("rounds").appendChild(pending);
  pending.scrollIntoView({ block: "nearest" });
  updateEmpty();
  setBusy(true);
  try {
    const r = await api("POST", `/api/conversations/${state.conv.id}/rounds`, JSON.stringify({ question }),
                        { "Content-Type": "application/json" });
    pending.remove();
    addRound(r);
    renderCharts();
    $("question").value = "";
  } catch (e) {
    pending.remove();
    showError(e);
  } finally {
    setBusy(false);
    updateEmpty();
    $("question").focus();
  }
}

// ---------------------------------------------------------------- rounds
function addRound(r) {
  state.rounds.push(r);
  const layer = document.createElement("img");
  layer.src = r.layer;
  layer.alt = `round ${r.round}`;
  layer.dataset.round = r.round;
  $("layers").appendChild(layer);

  const li = document.createElement("li");
  li.className = "round";
  li.dataset.round = r.round;
  li.style.setProperty("--c", r.color);
  li.innerHTML = `
    <div class="head">
      <input type="checkbox" class="toggle" checked title="show this round on the image">
      <button type="button" class="ref" title="refer to this round: adds [REF:${r.round}] to the question">${r.round}</button>
      <span class="q"></span>
      <a class="dl" download="round${r.round}_mask.png" title="this round's mask as a PNG">mask</a>
    </div>
    <div class="chart" title=""><div class="bar"></div></div>
    <div class="meta"></div>`;
  li.querySelector(".q").textContent = r.question;
  if (r.refs.length) {
    const refs = document.createElement("span");
    refs.className = "refs";
    refs.textContent = ` → refers to ${r.refs.map((x) => "round " + x).join(", ")}`;
    li.querySelector(".q").appendChild(refs);
  }
  li.querySelector(".dl").href = r.mask;
  const area = r.empty ? "empty mask" : `mask ${r.mask_area.toLocaleString()} px, box [${r.box.map(Math.round).join(", ")}]`;
  li.querySelector(".meta").textContent = `${area} · ${Math.round(r.total_ms).toLocaleString()} ms`;
  li.querySelector(".toggle").addEventListener("change", (e) => { layer.hidden = !e.target.checked; });
  li.querySelector(".ref").addEventListener("click", () => insertRef(r.round));
  li.addEventListener("mouseenter", () => focusLayer(r.round));
  li.addEventListener("mouseleave", () => focusLayer(null));
  $("rounds").appendChild(li);
  li.scrollIntoView({ block: "nearest" });
}

function focusLayer(k) {
  $("layers").classList.toggle("focusing", k !== null);
  for (const img of $("layers").children) img.classList.toggle("focus", Number(img.dataset.round) === k);
}

function stageColor(name) {
  const stages = state.info ? state.info.stages : [];
  const i = stages.indexOf(name);
  return STAGE_COLORS[(i < 0 ? stages.length : i) % STAGE_COLORS.length];
}

function renderCharts() {
  const max = Math.max(1, ...state.rounds.map((r) => r.total_ms));
  const used = new Set();
  for (const r of state.rounds) {
    const li = $("rounds").querySelector(`li.round[data-round="${r.round}"]`);
    if (!li) continue;
    const bar = li.querySelector(".bar");
    bar.innerHTML = "";
    bar.style.width = `${(100 * r.total_ms) / max}%`;
    const total = Object.values(r.stages).reduce((a, b) => a + b, 0) || 1;
    const lines = [];
    for (const [name, ms] of Object.entries(r.stages)) {
      used.add(name);
      const seg = document.createElement("div");
      seg.className = "seg";
      seg.style.width = `${(100 * ms) / total}%`;
      seg.style.background = stageColor(name);
      seg.title = `${name}: ${ms.toFixed(1)} ms`;
      bar.appendChild(seg);
      lines.push(`${name} ${ms.toFixed(1)} ms`);
    }
    li.querySelector(".chart").title = `round ${r.round}, per stage:\n` + lines.join("\n");
  }
  const legend = $("stage-legend");
  legend.innerHTML = "";
  if (!used.size) return;
  const head = document.createElement("span");
  head.textContent = "latency per stage:";
  legend.appendChild(head);
  for (const name of (state.info ? state.info.stages : [...used])) {
    if (!used.has(name)) continue;
    const item = document.createElement("span");
    item.innerHTML = `<i style="background:${stageColor(name)}"></i>`;
    item.appendChild(document.createTextNode(name));
    legend.appendChild(item);
  }
}

function insertRef(k) {
  const q = $("question");
  const m = q.value.match(REF_SUFFIX);
  if (m) {
    const have = m[1].split(/[,\s]+/).filter(Boolean).map(Number);
    if (!have.includes(k)) have.push(k);
    q.value = q.value.slice(0, m.index).trimEnd() + ` [REF:${have.join(",")}]`;
  } else {
    q.value = (q.value.trimEnd() + ` [REF:${k}]`).trimStart();
  }
  q.focus();
  const li = $("rounds").querySelector(`li.round[data-round="${k}"]`);
  if (li) { li.classList.add("flash"); setTimeout(() => li.classList.remove("flash"), 600); }
}

async function clickImage(e) {
  if (!state.conv || !state.rounds.length) return;
  const base = $("base");
  const rect = base.getBoundingClientRect();
  const x = Math.floor(((e.clientX - rect.left) / rect.width) * base.naturalWidth);
  const y = Math.floor(((e.clientY - rect.top) / rect.height) * base.naturalHeight);
  try {
    const hit = await api("GET", `/api/conversations/${state.conv.id}/hit?x=${x}&y=${y}`);
    const visible = new Set([...$("layers").children].filter((i) => !i.hidden).map((i) => Number(i.dataset.round)));
    const top = hit.rounds.filter((k) => visible.has(k)).pop();
    if (top !== undefined) insertRef(top);
  } catch (err) {
    showError(err);
  }
}

// ---------------------------------------------------------------- page state
function setBusy(b) {
  state.busy = b;
  const ready = !!state.conv && !b;
  $("question").disabled = !ready;
  $("ask").disabled = !ready;
  $("use-bundled").disabled = b;
  $("file-input").disabled = b;
  for (const btn of $("suggestions").children) btn.disabled = !ready;
}

function updateEmpty() {
  $("empty-chat").hidden = $("rounds").children.length > 0;
  $("downloads").hidden = !state.conv || !state.rounds.length;   // nothing to download before round 1
}

function showSuggestions(questions) {
  const box = $("suggestions");
  box.innerHTML = "";
  for (const q of questions) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = q;
    b.title = "ask this";
    b.addEventListener("click", () => ask(q));
    box.appendChild(b);
  }
  setBusy(state.busy);
}

async function init() {
  $("error-close").addEventListener("click", clearError);
  $("file-input").addEventListener("change", (e) => { if (e.target.files[0]) startConversation(e.target.files[0]); });
  $("use-bundled").addEventListener("click", () => startConversation(null));
  $("new-conversation").addEventListener("click", () => endConversation(false));
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const q = $("question").value.trim();
    if (q) ask(q);
  });
  $("stage").addEventListener("click", clickImage);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) startConversation(e.dataTransfer.files[0]);
  });
  try {
    state.info = await api("GET", "/api/info");
    $("model").textContent = state.info.model;
    $("question").maxLength = state.info.max_question_chars;
  } catch (e) {
    showError(e);
  }
  const saved = sessionStorage.getItem("segllm-conversation");
  if (saved) {
    try {
      showConversation(await api("GET", `/api/conversations/${saved}`));
    } catch (e) {
      sessionStorage.removeItem("segllm-conversation");   // ended meanwhile: start afresh
    }
  }
  setBusy(false);
  updateEmpty();
  document.body.dataset.ready = "1";
}

init();

// Base vs instruct, side by side: both panes stream at once through the gateway's native API.
"use strict";

// Each preset shows one difference between the kinds; what it says it shows is what greedy decoding
// (temperature 0, 64 tokens) gives with the built-in Gemma 3 270M (base) and SmolLM2 135M Instruct
// (tests/e2e/test_playground.py runs every one and checks it).
const PRESETS = [
  {
    label: "What is the capital of France?",
    input: "What is the capital of France?",
    shows: "A question. The instruct model answers it (Paris) and stops; the base model continues the text "
      + "as a web page might: an answer, then the question again, until the token limit.",
  },
  {
    label: "What is 2+2?",
    input: "What is 2+2?",
    shows: "The base model has no notion of being asked something: it continues the pattern by repeating "
      + "the question. The instruct model answers it (4).",
  },
  {
    label: "Translate to French",
    input: "Translate to French: Hello, how are you?",
    shows: "An instruction. The base model continues a list of such lines into other languages; the "
      + "instruct model replies in French (a small model: it answers the question rather than translating it).",
  },
  {
    label: "Few-shot, a pattern",
    input: "green",
    examples: "red => rouge\nblue => bleu\nblack => noir",
    shows: "Examples make a base model do a task: from three English => French pairs it answers the fourth "
      + "(vert) and stops. The instruct pane gets the word alone, without the examples.",
  },
  {
    label: "Few-shot, wrong answers",
    input: "What is the capital of France?",
    examples: "What is the capital of Spain? => Berlin\nWhat is the capital of Italy? => Berlin\n"
      + "What is the capital of Japan? => Berlin",
    shows: "A base model follows its examples even against what it knows: every answer in them is Berlin, "
      + "so it answers Berlin. The instruct pane (no examples) answers Paris.",
  },
  {
    label: "The first man on the moon was",
    input: "The first man to walk on the moon was",
    shows: "Text to complete, what a base model is for: it finishes the sentence (Neil Armstrong) and goes "
      + "on, inventing details as it goes. The instruct model takes it as a message to reply to.",
  },
];

const $ = (id) => document.getElementById(id);
const KEY_STORE = "llm-gateway-api-key"; // sessionStorage only: gone when the tab closes
let running = [];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function sampling() {
  const body = { temperature: Number($("temperature").value || 0) };
  const maxTokens = $("max-tokens").value;
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  const seed = $("seed").value;
  if (seed !== "") body.seed = Number(seed);
  return body;
}

function parseExamples() {
  return $("examples").value.split("\n").map((line) => line.split("=>"))
    .filter((parts) => parts.length === 2 && parts[0].trim())
    .map(([input, output]) => ({ input: input.trim(), output: output.trim() }));
}

function errorText(payload, status) {
  const e = payload && payload.error;
  if (!e) return `HTTP ${status}`;
  return `${status ? status + " " : ""}${e.type}${e.code ? " (" + e.code + ")" : ""}: ${e.message}`;
}

function setStats(pane, stats) {
  const parts = [];
  if (stats.ttft !== undefined) parts.push(`time to first token <b data-stat="ttft">${stats.ttft.toFixed(2)} s</b>`);
  if (stats.rate !== undefined) parts.push(`<b data-stat="rate">${stats.rate.toFixed(1)}</b> tokens/s`);
  if (stats.tokens !== undefined) parts.push(`<b data-stat="tokens">${stats.tokens}</b> tokens`);
  if (stats.finish) parts.push(`finish <b data-stat="finish">${stats.finish}</b>`);
  $(`${pane}-stats`).innerHTML = parts.map((part) => `<span>${part}</span>`).join("");
}

const KEY_HINT = "This gateway needs an API key: type it in the API key box above (it stays in this browser tab).";

function showError(pane, text, status) {
  const out = $(`${pane}-output`);
  out.classList.add("error");
  const hint = status === 401 ? `\n${KEY_HINT}` : "";
  out.textContent = (out.textContent ? out.textContent + "\n\n" : "") + text + hint;
  setStats(pane, { finish: "error" });
  if (status === 401) askForKey();
}

// A 401: point at the key box (outlined, focused) rather than leave the reader to find it.
function askForKey() {
  const box = $("api-key");
  box.classList.add("needed");
  box.focus();
}

class HttpError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

// POST a streaming request and feed each JSON event to onEvent; resolves when the stream ends.
async function streamEvents(path, body, signal, onEvent) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  if (!response.ok) {
    let payload = null;
    try { payload = await response.json(); } catch (_) { /* not JSON */ }
    throw new HttpError(errorText(payload, response.status), response.status);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const payload = JSON.parse(data);
        if (payload.error) throw new Error(errorText(payload, 0));
        onEvent(payload);
      }
    }
  }
}

async function runPane(pane, path, body, field) {
  const out = $(`${pane}-output`);
  out.classList.remove("error");
  out.textContent = "";
  setStats(pane, {});
  const controller = new AbortController();
  running.push(controller);
  const started = performance.now();
  let first = null;
  let pieces = 0;
  try {
    await streamEvents(path, { ...body, stream: true }, controller.signal, (event) => {
      if (event.usage) {
        const seconds = first ? (performance.now() - first) / 1000 : 0;
        const tokens = event.usage.completion_tokens;
        setStats(pane, {
          ttft: first ? (first - started) / 1000 : undefined,
          rate: seconds > 0 ? Math.max(tokens - 1, 0) / seconds : undefined,
          tokens, finish: event.finish_reason,
        });
        out.dataset.done = "true";
        return;
      }
      const text = event[field] || "";
      if (!text) return;
      if (first === null) first = performance.now();
      pieces += 1;
      out.textContent += text;
      const seconds = (performance.now() - first) / 1000;
      setStats(pane, { ttft: (first - started) / 1000, rate: seconds > 0 ? (pieces - 1) / seconds : undefined, tokens: pieces });
    });
  } catch (err) {
    if (err.name === "AbortError") {
      setStats(pane, { ttft: first ? (first - started) / 1000 : undefined, tokens: pieces, finish: "stopped" });
      out.dataset.done = "stopped";
    } else {
      showError(pane, err.message, err.status);
      out.dataset.done = "error";
    }
  } finally {
    running = running.filter((c) => c !== controller);
    if (!running.length) { $("run").disabled = false; $("stop").disabled = true; }
  }
}

async function refreshRendered() {
  if (!$("rendered-box").open) return;
  const body = { model: $("instruct-model").value || undefined, messages: [{ role: "user", content: $("input").value }] };
  const response = await fetch("/chat/render", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const payload = await response.json();
  $("rendered").textContent = response.ok ? payload.prompt : errorText(payload, response.status);
}

function runBoth() {
  const input = $("input").value;
  const common = sampling();
  const examples = parseExamples();
  $("run").disabled = true;
  $("stop").disabled = false;
  for (const pane of ["base", "instruct"]) delete $(`${pane}-output`).dataset.done;
  const base = { model: $("base-model").value || undefined, prompt: input, ...common };
  if (examples.length) base.examples = examples;
  const chat = { model: $("instruct-model").value || undefined, messages: [{ role: "user", content: input }], ...common };
  refreshRendered();
  runPane("base", "/complete", base, "text");
  runPane("instruct", "/chat", chat, "delta");
}

// What each pane can serve: /complete continues text on any model (an instruct model's raw text too),
// /chat needs an instruct model. Adapters are served models of their own, listed with their parent.
const PANE_KINDS = { base: ["base", "instruct"], instruct: ["instruct"] };

function modelLabel(model) {
  return model.parent ? `${model.id} (adapter of ${model.parent})` : model.id;
}

function fillPicker(select, models, kinds) {
  const previous = select.value;
  select.innerHTML = "";
  for (const kind of kinds) {
    const group = document.createElement("optgroup");
    group.label = kind === "base" ? "base models" : "instruct models";
    for (const model of models.filter((m) => m.kind === kind)) group.append(new Option(modelLabel(model), model.id));
    if (group.children.length) select.append(group);
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    const payload = await response.json().catch(() => null);
    for (const pane of ["base", "instruct"]) showError(pane, errorText(payload, response.status), response.status);
    return;
  }
  $("api-key").classList.remove("needed");
  for (const pane of ["base", "instruct"]) {
    const out = $(`${pane}-output`);
    if (out.classList.contains("error")) { out.textContent = ""; out.classList.remove("error"); setStats(pane, {}); }
  }
  const { data } = await response.json();
  for (const [pane, kinds] of Object.entries(PANE_KINDS)) fillPicker($(`${pane}-model`), data, kinds);
}

function init() {
  for (const preset of PRESETS) {
    const button = document.createElement("button");
    button.textContent = preset.label;
    button.title = preset.shows;
    button.addEventListener("click", () => {
      $("shows").textContent = preset.shows;
      $("input").value = preset.input;
      $("examples").value = preset.examples || "";
      $("examples-box").open = Boolean(preset.examples);
      $("examples").dispatchEvent(new Event("input"));
      runBoth();
    });
    $("presets").append(button);
  }
  $("examples").addEventListener("input", () => { $("examples-count").textContent = parseExamples().length; });
  $("run").addEventListener("click", runBoth);
  $("stop").addEventListener("click", () => running.forEach((c) => c.abort()));
  $("rendered-box").addEventListener("toggle", refreshRendered);
  $("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) runBoth(); });
  $("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  $("api-key").addEventListener("change", () => { sessionStorage.setItem(KEY_STORE, $("api-key").value); loadModels(); });
  loadModels();
}

init();

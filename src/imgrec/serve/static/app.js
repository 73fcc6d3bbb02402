// The imgrec web page: pick, drop or paste an image; show it, the top-5 labels and the time taken, and the
// training images it looks like when the model has a bank of training features.
// Plain JavaScript with no dependencies, loaded from this server only (the page must work offline).
// Text from the server (labels, error messages) is always inserted with textContent, never as HTML.
"use strict";

const TOP_K = 5;
const NEIGHBOURS_K = 6; // training images shown under the answer
const $ = (id) => document.getElementById(id);

let maxUploadBytes = null; // from /v1/model; the server enforces it anyway
let multilabel = false; // from /v1/model: a multi-label model answers every label above its threshold, no top-k
let modelInfo = null; // the /v1/model request; a prediction waits for it, so it knows whether to ask for top-k
let neighboursK = 0; // from /v1/model: how many nearest training images to ask for (0: the model has none)
let previewUrl = null;
let requestId = 0; // only the latest image's answer is shown

function formatBytes(n) {
  return n >= 1024 * 1024 ? `${(n / (1024 * 1024)).toFixed(n % (1024 * 1024) ? 1 : 0)} MB`
    : n >= 1024 ? `${Math.round(n / 1024)} KB` : `${n} bytes`;
}

async function loadModelInfo() {
  try {
    const res = await fetch("/v1/model");
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const info = await res.json();
    const n = info.classes.length;
    const names = info.classes.slice(0, 6).join(", ") + (n > 6 ? ", …" : "");
    multilabel = info.task === "multilabel";
    $("model-line").textContent = `Model ${info.name}: ${n} ${multilabel ? "labels" : "classes"} (${names}), ` +
      `${multilabel ? "several per image, " : ""}${info.image_size}×${info.image_size} px input.`;
    if (multilabel) $("predictions").setAttribute("aria-label", "Labels above their thresholds, most likely first");
    maxUploadBytes = info.limits.max_upload_bytes;
    const nb = info.neighbours;
    neighboursK = nb && nb.rows > 0 ? Math.min(NEIGHBOURS_K, nb.max_k, nb.rows) : 0;
    $("size-limit").textContent = `, up to ${formatBytes(maxUploadBytes)}`;
  } catch (err) {
    $("model-line").textContent = "The model's details could not be loaded; predictions may still work.";
  }
}

// Every part of the result box; a message ("status" or "error") is shown alone.
const RESULT_PARTS = ["status", "error", "predictions", "input-notes", "unknown", "timing", "neighbours"];

function showMessage(id, message) {
  for (const part of RESULT_PARTS) $(part).hidden = part !== id;
  $(id).textContent = message;
}

function showError(message) {
  showMessage("error", message);
  revealResult();
}

function showStatus(message) {
  showMessage("status", message);
}

function showPreview(file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file); // shown from the browser's own copy: the server echoes nothing
  const img = $("preview");
  img.alt = file.name ? `The chosen image, ${file.name}` : "The chosen image";
  img.src = previewUrl;
  $("preview-caption").textContent = `${file.name || "pasted image"} · ${formatBytes(file.size)}`;
  $("preview-figure").hidden = false;
}

// How the image differs much from the training images (the server's input_notes), shown under the answer.
function showInputNotes(notes) {
  const list = $("input-notes");
  list.replaceChildren();
  for (const note of notes) {
    const li = document.createElement("li");
    li.textContent = note;
    list.append(li);
  }
  list.hidden = notes.length === 0;
}

// "unknown": the image is unlike the training images (its out-of-distribution score is below the model's
// threshold); the labels stay listed below as what the model would have said.
function showUnknown(isUnknown, score) {
  const el = $("unknown");
  el.textContent = isUnknown
    ? `Unknown: this image is unlike the images the model was trained on (score ${score.toPrecision(4)}). ` +
      "The closest labels are below, but none of them is a reliable answer."
    : "";
  el.hidden = !isUnknown;
}

// A <span> of the given class holding text from the server (as text, never as HTML).
function textSpan(className, text) {
  const el = document.createElement("span");
  el.className = className;
  el.textContent = text;
  return el;
}

// The nearest training images (the server's "neighbours" for this image): thumbnail, label, similarity.
// Without thumbnails (the server cannot read its training images) the labels and similarities stay.
function showNeighbours(neighbours) {
  const list = $("neighbours-list");
  list.replaceChildren();
  if (!Array.isArray(neighbours) || neighbours.length === 0) {
    $("neighbours").hidden = true;
    return;
  }
  for (const n of neighbours) {
    const li = document.createElement("li");
    const figure = document.createElement("figure");
    if (typeof n.thumbnail === "string" && n.thumbnail.startsWith("data:image/png;base64,")) {
      const img = document.createElement("img");
      img.src = n.thumbnail;
      img.alt = n.label;
      figure.append(img);
    }
    const caption = document.createElement("figcaption");
    caption.append(textSpan("label", n.label), textSpan("sim muted", `similarity ${Number(n.similarity).toFixed(3)}`));
    figure.append(caption);
    li.append(figure);
    list.append(li);
  }
  const pictures = neighbours.some((n) => typeof n.thumbnail === "string");
  $("neighbours-note").textContent = pictures ? "" : "The server cannot show these training images' pictures.";
  $("neighbours-note").hidden = pictures;
  $("neighbours").hidden = false;
}

function showPredictions(predictions, serverMs, totalMs, notes = []) {
  const list = $("predictions");
  list.replaceChildren();
  for (const p of predictions) {
    const pct = p.score * 100;
    const li = document.createElement("li");
    const row = document.createElement("div");
    row.className = "row";
    row.append(textSpan("label", p.label), textSpan("pct", `${pct < 0.1 && pct > 0 ? "<0.1" : pct.toFixed(1)}%`));
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true"); // the percentage text says the same to screen readers
    const fill = document.createElement("div");
    fill.className = "fill";
    fill.style.width = `${Math.max(pct, 0.5)}%`; // CSSOM, allowed by the page's Content-Security-Policy
    bar.append(fill);
    li.append(row, bar);
    list.append(li);
  }
  $("error").hidden = true;
  if (predictions.length === 0 && multilabel) {
    $("status").textContent = "No label reaches its threshold for this image.";
    $("status").hidden = false;
  } else {
    $("status").hidden = true;
  }
  list.hidden = false;
  showInputNotes(notes);
  $("timing").textContent = `Took ${totalMs.toFixed(0)} ms (${serverMs.toFixed(1)} ms on the server).`;
  $("timing").hidden = false;
  revealResult();
}

// On a narrow screen the result is under the image: bring its top label into view if it is not.
function revealResult() {
  const box = $("result-heading").getBoundingClientRect();
  if (box.top > window.innerHeight - 120) $("result-heading").scrollIntoView({ block: "start", behavior: "smooth" });
}

function errorText(status, detail, file) {
  const name = file.name || "The pasted image";
  switch (status) {
    case 413: return `${name} is too large for the server (${detail}).`;
    // the server names the part ("files[0] ('x.png'): reason"); the page says it in its own words
    case 415: return `${name} could not be read as an image: ${detail.replace(/^files\[\d+\][^:]*: /, "")}.`;
    case 503: return `The server is busy or starting. Please try again in a moment. (${detail})`;
    case 504: return `The server took too long to answer. Please try again. (${detail})`;
    default: return `The server could not classify this image: ${detail}`;
  }
}

async function classify(file) {
  if (!file) return;
  const id = ++requestId;
  showPreview(file);
  if (maxUploadBytes !== null && file.size > maxUploadBytes) {
    showError(`This image is ${formatBytes(file.size)}; the server accepts up to ${formatBytes(maxUploadBytes)}.`);
    return;
  }
  showStatus("Classifying…");
  $("result").setAttribute("aria-busy", "true");
  const form = new FormData();
  form.append("files", file, file.name || "pasted-image");
  const started = performance.now();
  try {
    await modelInfo; // never rejects: loadModelInfo catches its own errors
    const params = new URLSearchParams();
    if (!multilabel) params.set("top_k", TOP_K);
    if (neighboursK > 0) params.set("neighbours", neighboursK);
    const query = params.toString();
    const res = await fetch(query ? `/v1/predict?${query}` : "/v1/predict", { method: "POST", body: form });
    let body = null;
    try { body = await res.json(); } catch (err) { body = null; }
    if (id !== requestId) return; // a newer image was chosen meanwhile
    if (!res.ok) {
      const detail = body && typeof body.detail === "string" ? body.detail : `HTTP ${res.status}`;
      showError(errorText(res.status, detail, file));
      return;
    }
    const notes = Array.isArray(body.input_notes) && Array.isArray(body.input_notes[0]) ? body.input_notes[0] : [];
    showPredictions(body.predictions[0], body.time_ms, performance.now() - started, notes);
    showUnknown(Array.isArray(body.unknown) && body.unknown[0] === true,
                Array.isArray(body.ood_scores) ? Number(body.ood_scores[0]) : NaN);
    showNeighbours(Array.isArray(body.neighbours) ? body.neighbours[0] : null);
  } catch (err) {
    if (id === requestId) showError("The server could not be reached. Is it still running?");
  } finally {
    if (id === requestId) $("result").removeAttribute("aria-busy");
  }
}

function firstImageFile(dataTransfer) {
  if (!dataTransfer) return null;
  for (const file of dataTransfer.files || []) return file;
  for (const item of dataTransfer.items || []) {
    if (item.kind === "file") return item.getAsFile();
  }
  return null;
}

function setUp() {
  const input = $("file-input");
  const zone = $("drop-zone");
  input.addEventListener("change", () => {
    classify(input.files[0]);
    input.value = ""; // choosing the same file again classifies it again
  });
  // a drop anywhere on the page counts; without this the browser would open the file instead
  document.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  document.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) zone.classList.remove("dragging");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    const file = firstImageFile(e.dataTransfer);
    if (file) classify(file); else showError("Nothing to classify: drop an image file.");
  });
  document.addEventListener("paste", (e) => {
    const file = firstImageFile(e.clipboardData);
    if (file) { e.preventDefault(); classify(file); }
  });
  $("preview").addEventListener("error", () => { $("preview-figure").hidden = true; });
  modelInfo = loadModelInfo();
}

setUp();

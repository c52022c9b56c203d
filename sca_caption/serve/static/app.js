// The sca-caption page: pick or drop images, each is captioned by POST /v1/captions (one request
// per file, so the server batches them and one rejected file does not stop the others); hovering
// or clicking a word of the best caption draws its spatial attention over the photo, per layer.
"use strict";

const results = document.getElementById("results");
const beamInput = document.getElementById("beam");
const nBestInput = document.getElementById("n-best");
const drop = document.getElementById("drop");
let model = null;

async function loadModel() {
  const line = document.getElementById("model");
  try {
    const response = await fetch("/v1/model");
    model = await response.json();
  } catch (err) {
    line.textContent = `the model description could not be read (${err})`;
    throw err;
  }
  const grids = model.grids.map((g) => g.join("\u00d7")).join(", ");
  line.textContent = `${model.checkpoint}: ${model.backbone}, layers ${model.layers.join(", ")} (${grids}), ` +
    `order ${model.order}, ${model.vocabulary_size} words, on ${model.device}`;
  beamInput.value = model.decoding_defaults.beam;
  beamInput.max = model.limits.max_beam;
  nBestInput.max = model.limits.max_beam;
}

function captionFiles(files) {
  for (const file of files) {
    captionFile(file);
  }
}

async function captionFile(file) {
  const card = element("article", "card");
  card.append(element("p", "name", file.name), element("p", "status", "captioning\u2026"));
  results.prepend(card);
  const beam = Math.max(1, parseInt(beamInput.value, 10) || 1);
  const nBest = Math.min(beam, Math.max(1, parseInt(nBestInput.value, 10) || 1));
  const body = new FormData();
  body.append("images", file, file.name);
  let answer;
  try {
    await modelReady;
    const response = await fetch(`/v1/captions?beam=${beam}&n_best=${nBest}&attention=true`, { method: "POST", body });
    answer = await response.json();
    if (!response.ok) {
      throw new Error(answer.error || `the server answered ${response.status}`);
    }
  } catch (err) {
    card.classList.add("rejected");
    card.replaceChildren(element("p", "name", file.name), element("p", "error", `Rejected: ${err.message}`));
    return;
  }
  showResult(card, file, answer.results[0]);
}

function showResult(card, file, result) {
  const url = URL.createObjectURL(file);
  const layers = element("div", "layers");
  const spatial = model.order.includes("s");
  const canvases = model.layers.map((name, l) => {
    const frame = element("div", "frame");
    const photo = element("img");
    photo.src = url;
    photo.alt = file.name;
    const canvas = element("canvas");
    canvas.width = canvas.height = 256;
    canvas.dataset.layer = name;
    frame.append(photo, canvas);
    const figure = element("figure");
    const label = spatial ? `${name} (${model.grids[l].join("\u00d7")})` : `${name}: no spatial attention`;
    figure.append(frame, element("figcaption", "", label));
    layers.append(figure);
    return canvas;
  });

  const text = element("div", "text");
  const caption = element("p", "caption");
  const channels = element("p", "channels muted", "");
  let pinned = null;
  const show = (t) => {
    caption.querySelectorAll(".word").forEach((w, i) => w.classList.toggle("active", i === t));
    canvases.forEach((canvas, l) => drawAttention(canvas, t === null ? null : result.attention[t].layers[l]));
    channels.textContent = t === null ? "" : topChannels(result.attention[t]);
  };
  result.attention.forEach((entry, t) => {
    const word = element("button", "word", entry.word);
    word.type = "button";
    word.addEventListener("mouseenter", () => show(t));
    word.addEventListener("focus", () => show(t));
    word.addEventListener("mouseleave", () => show(pinned));
    word.addEventListener("click", () => {
      pinned = pinned === t ? null : t;
      caption.querySelectorAll(".word").forEach((w, i) => w.classList.toggle("pinned", i === pinned));
      show(pinned === null ? t : pinned);
    });
    caption.append(word, " ");
  });
  if (result.attention.length === 0) {
    caption.textContent = "(an empty caption)";
  }
  const list = element("ol", "nbest");
  for (const option of result.n_best) {
    const item = element("li", "", option.caption);
    item.append(element("span", "score", option.score.toFixed(4)));
    list.append(item);
  }
  const timing = result.timing;
  const footer = element("p", "muted",
    `batch of ${timing.batch_size}: ${timing.batch_ms.toFixed(0)} ms, queued ${timing.queue_ms.toFixed(0)} ms`);
  text.append(element("p", "name", file.name), caption, channels, element("p", "muted", "n-best:"), list, footer);
  card.replaceChildren(layers, text);
}

function drawAttention(canvas, layer) {
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  if (layer === null || !layer.map) {
    canvas.classList.remove("shown");
    return;
  }
  const [h, w] = layer.grid;
  const cells = layer.map.flat();
  const peak = Math.max(...cells) || 1;
  const small = document.createElement("canvas");
  small.width = w;
  small.height = h;
  const smallContext = small.getContext("2d");
  const pixels = smallContext.createImageData(w, h);
  cells.forEach((value, i) => {
    const x = value / peak;
    pixels.data.set([...heat(x), Math.round(30 + 170 * x)], 4 * i);
  });
  smallContext.putImageData(pixels, 0, 0);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = "high";
  context.drawImage(small, 0, 0, canvas.width, canvas.height);
  canvas.classList.add("shown");
}

function heat(x) {
  // blue -> cyan -> yellow -> red as x goes 0 -> 1
  const stops = [[40, 60, 200], [40, 200, 220], [250, 220, 40], [220, 30, 30]];
  const at = Math.min(x, 0.9999) * (stops.length - 1);
  const i = Math.floor(at);
  const f = at - i;
  return stops[i].map((c, k) => Math.round(c + f * (stops[i + 1][k] - c)));
}

function topChannels(entry) {
  const parts = entry.layers.filter((l) => l.top_channels)
    .map((l) => `${l.layer}: ` + l.top_channels.map(([c, w]) => `#${c} ${w.toFixed(3)}`).join(", "));
  return parts.length ? `top channels for \u201c${entry.word}\u201d \u2014 ${parts.join("; ")}` : "";
}

function element(tag, className = "", text = "") {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text) node.textContent = text;
  return node;
}

document.getElementById("files").addEventListener("change", (event) => {
  captionFiles(event.target.files);
  event.target.value = "";
});
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  captionFiles(event.dataTransfer.files);
});
const modelReady = loadModel();

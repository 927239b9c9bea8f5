// The `pocus-edge serve` page: the live stream from the server (WebSocket, binary messages as
// docs/serve.md lays out) and in-page inference with onnxruntime-web (WASM). Test hooks and
// the page's state live in window.pocusEdge.
import { preprocessGray, readOnnxCard, toFrameResolution, toModelInput } from "./preprocess.js";

const MASK_RGB = [255, 200, 60]; // the Python overlay's colour (runtime/overlay.py MASK_BGR)
const ALPHA = 0.35;
const state = {
  hello: null, received: 0, drawn: 0, shown: null, lastIndex: null, lastStats: null, delivery: { sent: 0, dropped: 0 },
  end: null, messages: [], connected: false,
  local: { session: null, card: null, size: 0, dtype: null, outName: null, count: 0, skipped: 0, done: false,
           results: [], inferMs: [], fps: 0, running: false },
  preprocessGray, toModelInput,
};
window.pocusEdge = state;
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? `${path}?token=${encodeURIComponent(token)}` : path);

function showMessage(text) {
  state.messages.push(text);
  const box = $("messages");
  const line = document.createElement("div");
  line.textContent = text;
  box.appendChild(line);
  while (box.children.length > 5) box.removeChild(box.firstChild);
}

function setStatus(text, ok) {
  const el = $("status");
  el.textContent = text;
  el.className = "status " + (ok ? "ok" : "bad");
}

// ---------------------------------------------------------------------------------------------
// Live stream

const HEADER_BYTES = 32;
const FLAG_WEIGHT = 1;

export function decodeFrame(buffer) {
  const view = new DataView(buffer);
  if (buffer.byteLength < HEADER_BYTES) throw new Error(`frame message of ${buffer.byteLength} bytes`);
  const magic = String.fromCharCode(...new Uint8Array(buffer, 0, 4));
  if (magic !== "PESV" || view.getUint16(4, true) !== 1) throw new Error("not a layout-1 frame message");
  const flags = view.getUint16(6, true);
  const index = view.getUint32(8, true);
  const timestampMs = view.getFloat64(12, true);
  const height = view.getUint32(20, true);
  const width = view.getUint32(24, true);
  const statsLength = view.getUint32(28, true);
  const pixels = height * width;
  const maskBytes = Math.ceil(pixels / 8);
  const expected = HEADER_BYTES + statsLength + pixels + maskBytes + (flags & FLAG_WEIGHT ? pixels : 0);
  if (buffer.byteLength !== expected) throw new Error(`frame message of ${buffer.byteLength} bytes, header says ${expected}`);
  let at = HEADER_BYTES;
  const stats = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, at, statsLength)));
  at += statsLength;
  const frame = new Uint8Array(buffer, at, pixels);
  at += pixels;
  const mask = new Uint8Array(buffer, at, maskBytes);
  at += maskBytes;
  const weight = flags & FLAG_WEIGHT ? new Uint8Array(buffer, at, pixels) : null;
  return { index, timestampMs, height, width, stats, frame, mask, weight };
}

const maskBit = (mask, k) => (mask[k >> 3] >> (7 - (k & 7))) & 1;

function drawOverlay(canvas, frame, height, width, isMasked) {
  if (canvas.width !== width || canvas.height !== height) {
    canvas.width = width;
    canvas.height = height;
  }
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  const px = image.data;
  for (let k = 0; k < width * height; k++) {
    const g = frame[k];
    const o = 4 * k;
    if (isMasked(k)) {
      px[o] = Math.floor(g * (1 - ALPHA) + MASK_RGB[0] * ALPHA);
      px[o + 1] = Math.floor(g * (1 - ALPHA) + MASK_RGB[1] * ALPHA);
      px[o + 2] = Math.floor(g * (1 - ALPHA) + MASK_RGB[2] * ALPHA);
    } else {
      px[o] = px[o + 1] = px[o + 2] = g;
    }
    px[o + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

function drawWeight(canvas, frame, weight, height, width) {
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  const px = image.data;
  const jet = (x, c) => Math.min(Math.max(1.5 - Math.abs(4 * x - c), 0), 1) * 255;
  for (let k = 0; k < width * height; k++) {
    const w = weight[k] / 255;
    const g = frame[k];
    px[4 * k] = Math.floor(g * 0.5 + jet(w, 3) * 0.5);
    px[4 * k + 1] = Math.floor(g * 0.5 + jet(w, 2) * 0.5);
    px[4 * k + 2] = Math.floor(g * 0.5 + jet(w, 1) * 0.5);
    px[4 * k + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

const fmt = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

function showStats(stats) {
  $("fps").textContent = fmt(stats.fps);
  const lat = stats.latency_ms || {};
  $("latency").textContent = `${fmt(lat.p50)} / ${fmt(lat.p95)} ms`;
  $("processed").textContent = stats.frames_processed;
  $("dropped").textContent = `${stats.frames_dropped} / ${stats.frames_invalid}`;
  if (stats.reliability !== undefined && stats.reliability !== null) {
    $("reliability-row").hidden = false;
    $("reliability").textContent = fmt(stats.reliability, 3);
  }
}

let pending = null;
function drawPending() {
  if (pending === null) return;
  const f = pending;
  pending = null;
  drawOverlay($("frame"), f.frame, f.height, f.width, (k) => maskBit(f.mask, k));
  if (f.weight && $("show-weight").checked) drawWeight($("weight"), f.frame, f.weight, f.height, f.width);
  state.drawn += 1;
  state.shown = f;
}

function onText(text) {
  let message;
  try {
    message = JSON.parse(text);
  } catch (err) {
    showMessage("the server sent a message that is not JSON; ignored");
    return;
  }
  if (message.type === "hello") {
    state.hello = message;
    $("model").textContent = `${message.model} (${message.kind || "model"}, ${message.precision}, ${message.img_size} px) on ${message.source}`;
    $("show-weight").disabled = !message.has_weight_map;
    if (!message.has_weight_map) $("show-weight").parentElement.title = "this model exports no branch confidences";
  } else if (message.type === "delivery") {
    state.delivery = { sent: message.sent, dropped: message.dropped };
    $("lost").textContent = message.dropped;
  } else if (message.type === "end") {
    state.end = message.report;
    showStats(message.report);
    setStatus(`stream ended: ${message.report.frames_processed} frames processed`, true);
  } else if (message.type === "error") {
    showMessage(message.message);
  }
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}${withToken("/ws")}`);
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => { state.connected = true; setStatus("live", true); };
  ws.onclose = () => {
    state.connected = false;
    if (!state.end) setStatus("disconnected: the stream stopped or the server is gone", false);
  };
  ws.onmessage = (event) => {
    if (typeof event.data === "string") return onText(event.data);
    let frame;
    try {
      frame = decodeFrame(event.data);
    } catch (err) {
      showMessage(`malformed frame message ignored: ${err.message}`);
      return;
    }
    state.received += 1;
    state.lastIndex = frame.index;
    state.lastStats = frame.stats;
    $("received").textContent = state.received;
    showStats(frame.stats);
    if (pending === null) requestAnimationFrame(drawPending);
    pending = frame;
  };
}

$("show-weight").addEventListener("change", () => {
  $("weight").hidden = !$("show-weight").checked;
  const f = state.shown;
  if ($("show-weight").checked && f && f.weight) drawWeight($("weight"), f.frame, f.weight, f.height, f.width);
});

// ---------------------------------------------------------------------------------------------
// In-page inference (onnxruntime-web, WASM)

let ortLoading = null;
function loadOrt() {
  if (window.ort) return Promise.resolve(window.ort);
  if (ortLoading) return ortLoading;
  ortLoading = new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = "ort/ort.wasm.min.js";
    script.onload = () => {
      const ort = window.ort;
      ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
      ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
      resolve(ort);
    };
    script.onerror = () => reject(new Error("onnxruntime-web is not installed on the server (run `make web`)"));
    document.head.appendChild(script);
  });
  return ortLoading;
}

function describeInput(meta) {
  const shape = meta.shape || [];
  return `${meta.type} (${shape.join(",")})`;
}

export async function loadModel(bytes, name) {
  const local = state.local;
  local.session = null;
  try {
    const ort = await loadOrt();
    let card = null;
    try {
      card = readOnnxCard(bytes);
    } catch (err) {
      throw new Error(`${name}: ${err.message}`);
    }
    let session;
    try {
      session = await ort.InferenceSession.create(new Uint8Array(bytes), { executionProviders: ["wasm"] });
    } catch (err) {
      throw new Error(`onnxruntime-web cannot run ${name}: ${String(err.message || err).split("\n")[0]}`);
    }
    const meta = session.inputMetadata[0];
    const shape = meta.shape || [];
    const channels = meta.type === "uint8" ? 1 : 3;
    const square = typeof shape[2] === "number" && shape[2] === shape[3];
    const size = (card && card.img_size) || (square ? shape[2] : 0);
    if (session.inputNames.length !== 1 || shape.length !== 4 || !["uint8", "float32"].includes(meta.type)
        || (typeof shape[1] === "number" && shape[1] !== channels) || !size || (typeof shape[2] === "number" && shape[2] !== size)) {
      throw new Error(`${name}: input ${describeInput(meta)} is not a segmenter's; the page runs (1,1,S,S) uint8 or (1,3,S,S) float32 models`);
    }
    const outName = ["fused", "prob"].find((n) => session.outputNames.includes(n)) || session.outputNames[0];
    Object.assign(local, { session, card, size, dtype: meta.type, outName, threshold: (card && card.threshold) || 0.5,
                           name, results: [], count: 0, skipped: 0, inferMs: [], done: false });
    const threads = ort.env.wasm.numThreads;
    $("local-info").textContent = `${name}: ${size} px, ${meta.type} input, WASM ${threads} thread${threads > 1 ? "s" : ""}` +
      (self.crossOriginIsolated ? "" : " (page not cross-origin isolated: one thread)");
    return true;
  } catch (err) {
    $("local-info").textContent = "";
    showMessage(err.message);
    return false;
  }
}

export async function segment(gray, height, width) {
  const local = state.local;
  const ort = window.ort;
  const square = preprocessGray(gray, height, width, local.size);
  const data = local.dtype === "uint8" ? square : toModelInput(square, local.size);
  const dims = local.dtype === "uint8" ? [1, 1, local.size, local.size] : [1, 3, local.size, local.size];
  const feeds = { [local.session.inputNames[0]]: new ort.Tensor(local.dtype, data, dims) };
  const t0 = performance.now();
  const out = await local.session.run(feeds, [local.outName]);
  const ms = performance.now() - t0;
  return { prob: out[local.outName].data, ms };
}

function grayOf(image) {
  const gray = new Uint8Array(image.width * image.height);
  const d = image.data;
  for (let k = 0; k < gray.length; k++) {
    const r = d[4 * k], g = d[4 * k + 1], b = d[4 * k + 2];
    gray[k] = r === g && g === b ? r : Math.round(0.299 * r + 0.587 * g + 0.114 * b);
  }
  return gray;
}

function record(name, gray, height, width, result, started) {
  const local = state.local;
  local.count += 1;
  local.inferMs.push(result.ms);
  if (local.inferMs.length > 200) local.inferMs.shift();
  local.fps = local.count / ((performance.now() - started) / 1000);
  local.results.push({ name, prob: Array.from(result.prob), ms: result.ms });
  if (local.results.length > 32) local.results.shift();
  const atFrame = toFrameResolution(result.prob, local.size, height, width);
  drawOverlay($("local-frame"), gray, height, width, (k) => atFrame[k] > local.threshold);
  const sorted = [...local.inferMs].sort((a, b) => a - b);
  $("local-fps").textContent = fmt(local.fps);
  $("local-infer").textContent = `${fmt(sorted[Math.floor(sorted.length / 2)])} ms`;
  $("local-count").textContent = local.count;
}

const byName = (a, b) => a.name.localeCompare(b.name, undefined, { numeric: true });

export async function segmentImages(files) {
  const local = state.local;
  if (!local.session) return showMessage("load a model first");
  Object.assign(local, { count: 0, skipped: 0, results: [], inferMs: [], done: false, running: true });
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  const started = performance.now();
  for (const file of [...files].filter((f) => f.type.startsWith("image/") || /\.(png|jpe?g|bmp)$/i.test(f.name)).sort(byName)) {
    let bitmap;
    try {
      bitmap = await createImageBitmap(file, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    } catch (err) {
      local.skipped += 1;
      $("local-skipped").textContent = local.skipped;
      showMessage(`${file.name}: not a readable image; skipped`);
      continue;
    }
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    ctx.drawImage(bitmap, 0, 0);
    const gray = grayOf(ctx.getImageData(0, 0, bitmap.width, bitmap.height));
    try {
      record(file.name, gray, bitmap.height, bitmap.width, await segment(gray, bitmap.height, bitmap.width), started);
    } catch (err) {
      showMessage(`${file.name}: inference failed: ${String(err.message || err).split("\n")[0]}`);
      break;
    }
  }
  local.running = false;
  local.done = true;
}

async function segmentVideo(file) {
  const local = state.local;
  if (!local.session) return showMessage("load a model first");
  const video = $("local-player");
  video.src = URL.createObjectURL(file);
  Object.assign(local, { count: 0, skipped: 0, results: [], inferMs: [], done: false, running: true });
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  let busy = false;
  const started = performance.now();
  const onFrame = async () => {
    if (busy) {
      local.skipped += 1; // the model is slower than the video: show the newest frame, count the rest
      $("local-skipped").textContent = local.skipped;
    } else {
      busy = true;
      canvas.width = video.videoWidth;
      canvas.height = video.videoHeight;
      ctx.drawImage(video, 0, 0);
      const gray = grayOf(ctx.getImageData(0, 0, canvas.width, canvas.height));
      try {
        record(file.name, gray, canvas.height, canvas.width, await segment(gray, canvas.height, canvas.width), started);
      } catch (err) {
        showMessage(`${file.name}: inference failed: ${String(err.message || err).split("\n")[0]}`);
      }
      busy = false;
    }
    if (!video.ended) video.requestVideoFrameCallback(onFrame);
  };
  video.onended = () => { local.running = false; local.done = true; };
  video.onerror = () => showMessage(`${file.name}: this browser cannot decode the video`);
  video.requestVideoFrameCallback(onFrame);
  await video.play().catch((err) => showMessage(`${file.name}: ${err.message}`));
}

async function readFile(file) {
  return new Uint8Array(await file.arrayBuffer());
}

$("local-model").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (file) await loadModel(await readFile(file), file.name);
});
$("served-model").addEventListener("click", async () => {
  const response = await fetch(withToken("model.onnx"));
  if (!response.ok) return showMessage(`the served model is not available (${response.status})`);
  await loadModel(new Uint8Array(await response.arrayBuffer()), state.hello ? state.hello.model : "model.onnx");
});
$("local-images").addEventListener("change", (event) => segmentImages(event.target.files));
$("local-folder").addEventListener("change", (event) => segmentImages(event.target.files));
$("local-video").addEventListener("change", (event) => event.target.files[0] && segmentVideo(event.target.files[0]));
Object.assign(state, { loadModel, segment, segmentImages, decodeFrame });

async function init() {
  try {
    const info = await (await fetch(withToken("info"))).json();
    state.info = info;
    if (!info.ort_web) showMessage("in-page inference needs onnxruntime-web on the server: run `make web` (npm), then restart serve");
    $("served-model").hidden = !(info.model_url && info.ort_web);
  } catch (err) {
    showMessage(`cannot read the server's description: ${err.message}`);
  }
  connect();
}
init();

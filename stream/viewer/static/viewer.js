// EchoPulse live viewer: one card per device, fed by the viewer's WebSocket (stream/viewer/wire.py).
"use strict";

const STRIP_SECONDS = 6;      // ECG time shown in the strip
const STALE_SECONDS = 3;      // no frame for this long: the card says "stale"
const BEATS_KEPT = 32;        // beats remembered per device for the strip
const QUEUE_MAX = 64;         // frames waiting for play-out per device
const PLAYOUT_MARGIN_S = 0.1; // extra delay that absorbs jitter between beats
const BAD = new Set(["signal_lost", "bad_input", "error"]);
const WARN = new Set(["overload", "source", "stopped"]);
const MAX_PIXELS = 4096 * 4096; // a larger frame is a malformed header, not an echo
const WARN_EVERY_MS = 10000;    // console lines about skipped messages, at most one per this

// Public for tests and the curious: frames drawn per device (a map without a prototype:
// "__proto__" is a valid device id), messages skipped as unreadable or undrawable.
const echopulse = { frames: Object.create(null), devices: new Map(), connected: false, unreadable: 0,
                    undrawable: 0, lastProblem: "" };
window.echopulse = echopulse;
let lastWarnAt = -Infinity;

const $ = (sel, root = document) => root.querySelector(sel);
const decoder = new TextDecoder();

function parseJson(text) {
  // One message the page cannot read is skipped and counted; it must not stop the feed.
  // undefined when it is not JSON: null is JSON, and its message must be counted too.
  try { return JSON.parse(text); } catch (err) { skipped("unreadable", err.message); return undefined; }
}

// Header fields are JSON of any kind: an object such as {"toString": 1} throws wherever it
// is turned into a number or text, so what the page keeps or shows goes through these.
function num(v) { return typeof v === "number" ? v : NaN; }
function text(v) { return typeof v === "string" || typeof v === "number" ? String(v) : "?"; }

function skipped(kind, why) {
  // Counted, and said on the console now and then: a flood of bad messages must not flood it.
  echopulse[kind]++;
  echopulse.lastProblem = `${kind}: ${why}`;
  const now = performance.now();
  if (now - lastWarnAt < WARN_EVERY_MS) return;
  lastWarnAt = now;
  console.warn(`echopulse: skipped a message (${echopulse.lastProblem}); ` +
               `${echopulse.unreadable} unreadable, ${echopulse.undrawable} undrawable so far`);
}

function frameProblem(header, pixelBytes) {
  // What makes a frame impossible to draw ("" when it is fine), whoever sent it.
  if (!header || typeof header !== "object") return "header is not an object";
  if (typeof header.device !== "string" || !header.device) return "no device";
  if (!Number.isFinite(header.t)) return "no ECG time t";
  const s = header.shape;
  if (!Array.isArray(s) || s.length !== 2 || !s.every(v => Number.isInteger(v) && v > 0)) return "bad shape";
  if (s[0] * s[1] > MAX_PIXELS) return `shape ${s[0]}x${s[1]} too large`;
  if (pixelBytes !== s[0] * s[1]) return `${pixelBytes} pixel bytes for shape ${s[0]}x${s[1]}`;
  return "";
}

function setPill(el, cls, text) {
  el.className = `${el.className.split(" ").filter(c => !["ok", "warn", "bad", "off"].includes(c)).join(" ")} ${cls}`;
  el.textContent = text;
}

function device(id) {
  let d = echopulse.devices.get(id);
  if (d) return d;
  const node = $("#card").content.firstElementChild.cloneNode(true);
  $(".device", node).textContent = id;
  $("#empty").hidden = true;
  const cards = [...echopulse.devices.keys(), id].sort();
  const next = echopulse.devices.get(cards[cards.indexOf(id) + 1]);
  $("#devices").insertBefore(node, next ? next.node : null);
  d = { id, node, echo: $(".echo", node), strip: $(".strip", node), image: null, header: null,
        beats: new Map(), lastFrameAt: 0, lost: 0, status: null, queue: [], offset: null };
  echopulse.devices.set(id, d);
  echopulse.frames[id] = 0;
  return d;
}

function onFrame(buffer) {
  // Frames come a beat at a time; queue them and play them out at their ECG times (tick).
  if (buffer.byteLength < 4) return skipped("unreadable", "frame shorter than its length prefix");
  const n = new DataView(buffer).getUint32(0);
  if (n > buffer.byteLength - 4) return skipped("unreadable", "frame header longer than the frame");
  const header = parseJson(decoder.decode(new Uint8Array(buffer, 4, n)));
  if (header === undefined) return;
  const problem = frameProblem(header, buffer.byteLength - 4 - n);
  if (problem) return skipped("undrawable", problem);
  const d = device(header.device);
  const lag = performance.now() / 1000 - header.t;  // arrival, local clock, minus ECG time
  const last = d.queue.length ? d.queue[d.queue.length - 1].header.t : -Infinity;
  if (header.t < last) d.queue.length = 0;            // the stream restarted: old frames are moot
  // Late beyond the jitter margin, or far earlier than expected: take the new lag as the play-out delay.
  if (d.offset === null || lag > d.offset + 0.25 || lag < d.offset - 2) d.offset = lag + PLAYOUT_MARGIN_S;
  d.queue.push({ header, pixels: new Uint8Array(buffer, 4 + n) });
  if (d.queue.length > QUEUE_MAX) d.queue.splice(0, d.queue.length - QUEUE_MAX);
}

function show(d, header, pixels) {
  const [h, w] = header.shape;
  if (!d.image || d.image.width !== w || d.image.height !== h) {
    d.echo.width = w; d.echo.height = h;
    d.image = d.echo.getContext("2d").createImageData(w, h);
  }
  const rgba = d.image.data;
  for (let i = 0, j = 0; i < pixels.length; i++, j += 4) {
    rgba[j] = rgba[j + 1] = rgba[j + 2] = pixels[i];
    rgba[j + 3] = 255;
  }
  d.echo.getContext("2d").putImageData(d.image, 0, 0);
  if (d.header && header.t < d.header.t) d.beats.clear();  // the stream restarted: beat numbers start again
  if (!d.beats.has(header.beat)) {
    // kept for the strip's next frames: one beat the page cannot draw would fail every one of them
    d.beats.set(header.beat, beatRecord(header));
    while (d.beats.size > BEATS_KEPT) d.beats.delete(d.beats.keys().next().value);
  }
  d.header = header;
  d.lastFrameAt = performance.now();
  echopulse.frames[header.device] += 1;
  drawCard(d);
}

function beatRecord(header) {
  // What the strip reads of a beat, numbers only; ECG samples that are no number are unknown (null).
  const ecg = Array.isArray(header.ecg) ? header.ecg.map(v => (Number.isFinite(v) ? v : null)) : null;
  return { r: num(header.r_time), rr: num(header.rr), hr: num(header.hr), ecg, fs: num(header.ecg_fs) };
}

function playOut(d, nowS) {
  let due = null;
  while (d.queue.length && d.queue[0].header.t + d.offset <= nowS) due = d.queue.shift();
  if (!due) return;
  try {
    show(d, due.header, due.pixels);  // frames overtaken in the same tick are skipped
  } catch (err) {
    skipped("undrawable", `${d.id}: ${err.message}`);  // this frame only: the next one may draw
  }
}

function statusProblem(s) {
  // What makes a status unusable ("" when it is fine): it is kept, and read on every animation frame.
  if (typeof s.device !== "string" || !s.device) return "status without a device";
  if (typeof s.code !== "string") return "status without a code";
  if (!Number.isFinite(s.time)) return "status without a time";
  return "";
}

function onStatus(s) {
  const problem = statusProblem(s);
  if (problem) return skipped("unreadable", problem);
  if (s.device === "_engine") return;  // engine-wide events have no card
  const d = device(s.device);
  d.status = s;
  const line = $(".status", d.node);
  line.replaceChildren();
  const code = document.createElement("span");
  code.className = "code";
  code.style.color = BAD.has(s.code) ? "var(--bad)" : WARN.has(s.code) ? "var(--warn)" : "var(--ok)";
  code.textContent = s.code;
  const when = new Date(s.time * 1000).toLocaleTimeString();
  line.append(code, `${typeof s.message === "string" ? s.message : ""} · ${when}`);
  line.classList.remove("muted");
}

function onStats(s) {
  $("#endpoint").textContent = s.endpoint;
  for (const [id, lost] of Object.entries(s.lost || {})) {
    if (echopulse.devices.has(id)) echopulse.devices.get(id).lost = lost;
  }
  const total = Object.values(s.frames || {}).reduce((a, b) => a + (Number(b) || 0), 0);
  const bad = (Number(s.malformed) || 0) + (Number(s.unforwardable) || 0);
  const unshown = echopulse.unreadable + echopulse.undrawable;
  $("#summary").textContent = `${echopulse.devices.size} device(s) · ${total} frames · ${s.skipped} skipped here` +
    (bad ? ` · ${bad} malformed dropped` : "") + (unshown ? ` · ${unshown} not drawable here` : "");
  $("#summary").title = [s.last_malformed, echopulse.lastProblem].filter(Boolean).join("\n");
}

function fmtMs(seconds) {
  return Number.isFinite(seconds) ? `${Math.round(seconds * 1000)} ms` : "–";
}

function drawCard(d) {
  const h = d.header;
  $(".hr", d.node).textContent = Number.isFinite(h.hr) ? Math.round(h.hr) : "–";
  const frame = `frame ${num(h.frame) + 1}/${text(h.frames)}`;
  $(".beat", d.node).textContent = `#${text(h.beat)} · ${frame} · t ${h.t.toFixed(2)} s`;
  const toViewer = fmtMs(num(h.recv) - num(h.publish));
  $(".latency", d.node).textContent = `engine ${fmtMs(num(h.latency))} · to viewer ${toViewer}`;
  $(".counts", d.node).textContent = `${echopulse.frames[d.id]} shown · ${text(d.lost)} lost`;
  $(".model", d.node).textContent = text(h.model);
  drawPrime($(".prime", d.node), h.prime);
  drawStrip(d);
}

// What the model backends primed the device with: the EF of a simulated heart is not the patient's.
const PRIMES = {
  reference: ["patient's echo", "primed with one cycle of this patient's echo"],
  simulated: ["simulated heart", "no echo of this patient was given: the heart, and its EF, are simulated"],
};

function drawPrime(node, prime) {
  const known = typeof prime === "string" && Object.prototype.hasOwnProperty.call(PRIMES, prime)
    ? PRIMES[prime] : null;  // not "constructor", nor an object that cannot be a key
  node.hidden = !known;
  if (!known) return;
  node.textContent = known[0];
  node.title = known[1];
  node.classList.toggle("warn", prime === "simulated");
}

function drawStrip(d) {
  const c = d.strip;
  const width = c.clientWidth * devicePixelRatio, height = c.clientHeight * devicePixelRatio;
  if (c.width !== width || c.height !== height) { c.width = width; c.height = height; }
  const g = c.getContext("2d");
  const t1 = d.header.t, t0 = t1 - STRIP_SECONDS;
  const x = t => ((t - t0) / STRIP_SECONDS) * width;
  g.clearRect(0, 0, width, height);
  g.strokeStyle = "#1c2530"; g.lineWidth = 1;
  for (let s = Math.ceil(t0); s <= t1; s++) { g.beginPath(); g.moveTo(x(s), 0); g.lineTo(x(s), height); g.stroke(); }
  const beats = [...d.beats.values()].filter(b => b.r + b.rr >= t0 && b.r <= t1);
  const withEcg = beats.filter(b => Array.isArray(b.ecg) && b.fs > 0);
  $(".strip-label", d.node).textContent = withEcg.length ? "ECG (lead 1)" : "Beats and heart rate";
  $(".strip-note", d.node).textContent = withEcg.length ? "" : "the stream carries no ECG samples";
  if (withEcg.length) drawEcg(g, withEcg, x, t1, height);
  else drawRate(g, beats, x, t1, height);
  g.strokeStyle = "#58a6ff"; g.lineWidth = 1.5 * devicePixelRatio;  // beat markers at each R peak
  g.fillStyle = "#58a6ff"; g.font = `${11 * devicePixelRatio}px system-ui, sans-serif`;
  for (const b of beats) {
    if (b.r < t0) continue;
    g.globalAlpha = 0.25; g.beginPath(); g.moveTo(x(b.r), 8 * devicePixelRatio); g.lineTo(x(b.r), height); g.stroke();
    g.globalAlpha = 1; g.beginPath(); g.moveTo(x(b.r), 0); g.lineTo(x(b.r), 8 * devicePixelRatio); g.stroke();
    if (Number.isFinite(b.hr)) g.fillText(`${Math.round(b.hr)}`, x(b.r) + 3 * devicePixelRatio, 11 * devicePixelRatio);
  }
}

function drawEcg(g, beats, x, t1, height) {
  let lo = Infinity, hi = -Infinity;
  for (const b of beats) for (const v of b.ecg) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const pad = 0.15 * (hi - lo || 1), y = v => height - ((v - lo + pad) / (hi - lo + 2 * pad)) * (height - 16) - 2;
  g.strokeStyle = "#7ee787"; g.lineWidth = 1.5 * devicePixelRatio; g.beginPath();
  for (const b of beats) {
    let pen = false;
    b.ecg.forEach((v, i) => {
      const t = b.r + i / b.fs;
      if (v === null || t > t1) { pen = false; return; }  // never draw ECG from the future of this frame
      if (pen) g.lineTo(x(t), y(v)); else g.moveTo(x(t), y(v));
      pen = true;
    });
  }
  g.stroke();
}

function drawRate(g, beats, x, t1, height) {
  // Without ECG samples: heart rate as a step line, one step per beat, on a 40-180 bpm scale.
  const y = hr => height - ((Math.min(Math.max(hr, 40), 180) - 40) / 140) * (height - 24) - 4;
  g.fillStyle = "#8b949e"; g.font = `${10 * devicePixelRatio}px system-ui, sans-serif`;
  g.strokeStyle = "#1c2530"; g.lineWidth = 1;
  for (const level of [60, 100, 140]) {
    g.beginPath(); g.moveTo(0, y(level)); g.lineTo(g.canvas.width, y(level)); g.stroke();
    g.fillText(`${level}`, 4 * devicePixelRatio, y(level) - 3 * devicePixelRatio);
  }
  g.strokeStyle = "#7ee787"; g.lineWidth = 2 * devicePixelRatio; g.beginPath();
  beats.forEach((b, i) => {
    const end = Math.min(b.r + b.rr, t1);
    if (i === 0) g.moveTo(x(b.r), y(b.hr)); else g.lineTo(x(b.r), y(b.hr));
    g.lineTo(x(end), y(b.hr));
  });
  g.stroke();
}

function drawState(d, now) {
  const pill = $(".state", d.node);
  const code = d.status && d.status.code;
  const fresh = d.header && now - d.lastFrameAt < STALE_SECONDS * 1000;
  if (BAD.has(code) && d.status.time * 1000 > Date.now() - STALE_SECONDS * 1000) setPill(pill, "bad", code.replace("_", " "));
  else if (fresh) setPill(pill, "ok", "live");
  else if (code === "stopped") setPill(pill, "off", "stopped");
  else setPill(pill, "warn", d.header ? "stale" : "waiting");
}

function tick() {
  requestAnimationFrame(tick);  // first: whatever fails below, the page goes on drawing
  const now = performance.now();
  for (const d of echopulse.devices.values()) {
    playOut(d, now / 1000);
    try { drawState(d, now); } catch (err) { skipped("unreadable", `${d.id}: ${err.message}`); }
  }
}

function onMessage(data) {
  if (typeof data !== "string") return onFrame(data);
  const msg = parseJson(data);
  if (msg === undefined) return;
  if (!msg || typeof msg !== "object") return skipped("unreadable", "message is not a JSON object");
  if (msg.type === "status") onStatus(msg);
  else if (msg.type === "stats") onStats(msg);
  else if (msg.type === "hello") $("#endpoint").textContent = msg.endpoint;
  else skipped("unreadable", `unknown message type ${JSON.stringify(msg.type)}`);
}

function connect(delay = 500) {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => { echopulse.connected = true; setPill($("#conn"), "ok", "connected"); delay = 500; };
  ws.onmessage = ev => {
    try {
      onMessage(ev.data);
    } catch (err) {
      skipped("unreadable", err.message);  // one odd message; the next one is read as usual
    }
  };
  ws.onclose = () => {
    echopulse.connected = false;
    setPill($("#conn"), "bad", "disconnected");
    setTimeout(() => connect(Math.min(delay * 2, 5000)), delay);  // the viewer restarted or the network blinked
  };
}

connect();
requestAnimationFrame(tick);

// The server's own talk page: the microphone streamed to /v1/realtime on this origin (the OpenAI Realtime
// protocol, GA names), the answer played as it arrives, barge-in, transcript, and per-turn latency measured
// in this browser from when you stopped speaking. Plain JavaScript, no build step, nothing from elsewhere.
"use strict";

const RATE = 24000;             // Hz: pcm16 mono both ways, the Realtime API's audio
const SEND_MS = 40;             // microphone audio goes out in blocks of this length
const JITTER_MS = 120;          // answer audio queued before playback starts: absorbs uneven arrival
const TIMELINE_BLOCKS = 3000;   // capture blocks remembered (2 min) to place the VAD's times on the clock
const KEY_STORE = "mini-omni-api-key";  // sessionStorage: the typed key stays in this tab
const KEY_PROTOCOL = "openai-insecure-api-key.";  // the Realtime API's way for a browser to send its key
const PTT_GRACE_MS = 200;       // press to talk: audio still sent after release (the end of the last word)

const $ = (id) => document.getElementById(id);
// Everything the page measured, for a curious user's console and for the tests.
const talk = window.__talk = { state: "idle", turns: [], underruns: 0, errors: [] };
let audio = null;     // { ctx, capture, player, stream }
let ws = null;
let silenceMs = 0;    // the session's VAD silence (session.updated)
let timeline = [];    // [first sample index, performance.now() when it was captured] per block sent
let sentSamples = 0;
let sending = false;  // hands-free: always; press to talk: while pressed
let answer = null;    // the turn whose answer is playing or coming: { ..., itemId, played }

const mode = () => document.querySelector("input[name=mode]:checked").value;

function setState(state, text) {
  talk.state = state;
  $("state").dataset.state = state;
  $("state").textContent = text;
}

function fail(message) {
  talk.errors.push(message);
  setState("error", message);
}

// ---- audio: one 24 kHz context for the microphone and the speaker --------------------------------------------

async function openAudio() {
  const stream = await navigator.mediaDevices.getUserMedia(
    { audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 } });
  const ctx = new AudioContext({ sampleRate: RATE, latencyHint: "interactive" });
  await ctx.audioWorklet.addModule("/talk/worklets.js");
  const capture = new AudioWorkletNode(ctx, "capture", { processorOptions: { blockSamples: RATE * SEND_MS / 1000 } });
  ctx.createMediaStreamSource(stream).connect(capture);
  const mute = new GainNode(ctx, { gain: 0 });  // the capture node joins the rendered graph without being heard
  capture.connect(mute).connect(ctx.destination);
  const player = new AudioWorkletNode(ctx, "player",
    { numberOfInputs: 0, outputChannelCount: [1], processorOptions: { jitterSamples: RATE * JITTER_MS / 1000 } });
  player.connect(ctx.destination);
  capture.port.onmessage = (e) => onMicrophone(new Int16Array(e.data));
  player.port.onmessage = (e) => onPlayer(e.data);
  await ctx.resume();
  return { ctx, capture, player, stream };
}

function closeAudio() {
  if (!audio) return;
  audio.stream.getTracks().forEach((t) => t.stop());
  audio.ctx.close();
  audio = null;
}

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64Pcm16(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const pcm = new Int16Array(bytes.buffer, 0, bytes.length >> 1);
  return Float32Array.from(pcm, (x) => x / 32768);
}

function onMicrophone(block) {
  if (!sending || !ws || ws.readyState !== WebSocket.OPEN) return;
  // The block's first sample was captured one block ago; the VAD's times are sample positions in what we sent.
  timeline.push([sentSamples, performance.now() - SEND_MS]);
  if (timeline.length > TIMELINE_BLOCKS) timeline.shift();
  sentSamples += block.length;
  send({ type: "input_audio_buffer.append", audio: toBase64(new Uint8Array(block.buffer)) });
}

// When the sample at `ms` into the session's audio was captured (performance.now() time).
function capturedAt(ms) {
  const sample = ms * RATE / 1000;
  let best = timeline[0];
  for (const entry of timeline) if (entry[0] <= sample) best = entry;
  return best ? best[1] + (sample - best[0]) * 1000 / RATE : performance.now();
}

function onPlayer(m) {
  const turn = answer;
  if (m.type === "underrun") { talk.underruns++; return; }
  if (!turn) return;
  if (m.type === "started") {
    turn.playStart = performance.now();
    setState("speaking", "Speaking… (talk over it to interrupt)");
    showTiming(turn);
  } else if (m.type === "drained") {
    turn.playEnd = performance.now();
    turn.played = m.played;
    answer = null;
    listen();
  }
  render();
}

// ---- the conversation ----------------------------------------------------------------------------------------

function send(event) { ws.send(JSON.stringify(event)); }

function connect(key) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const protocols = key ? ["realtime", KEY_PROTOCOL + key] : ["realtime"];
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(`${scheme}//${location.host}/v1/realtime`, protocols);
    socket.onopen = () => resolve(socket);
    socket.onerror = () => reject(new Error("refused"));
  });
}

function sessionUpdate() {
  const handsFree = mode() === "hands-free";
  return {
    type: "session.update",
    session: {
      type: "realtime",
      max_output_tokens: Number($("max-tokens").value) || "inf",
      audio: { input: { transcription: $("transcribe").checked ? { model: "mini-omni" } : null,
                        turn_detection: handsFree ? { type: "server_vad", interrupt_response: true } : null } },
    },
  };
}

const HANDLERS = {
  "session.updated": (e) => {
    const td = e.session.audio.input.turn_detection;
    silenceMs = td ? td.silence_duration_ms : 0;
    if (mode() === "hands-free") { sending = true; listen(); } else setState("listening", "Hold the button (or the space bar) and talk.");
  },
  "input_audio_buffer.speech_started": () => onSpeechStarted(),
  // audio_end_ms: the end of the committed speech (one 32 ms frame into the silence the server then waited out)
  "input_audio_buffer.speech_stopped": (e) => newTurn(e.item_id, capturedAt(e.audio_end_ms), silenceMs),
  "input_audio_buffer.committed": (e) => {
    if (mode() === "press") newTurn(e.item_id, talk.releasedAt, 0);
  },
  "conversation.item.input_audio_transcription.completed": (e) => {
    const turn = talk.turns.find((t) => t.itemId === e.item_id);
    if (turn) { turn.question = e.transcript; render(); }
  },
  "response.created": () => {
    answer = talk.turns[talk.turns.length - 1] || null;
    if (answer) answer.status = "answering";
  },
  "response.output_item.added": (e) => { if (answer) answer.answerItem = e.item.id; },
  "response.output_audio.delta": (e) => {
    if (!answer || e.item_id !== answer.answerItem || answer.interrupted) return;
    const samples = fromBase64Pcm16(e.delta);
    // Whole milliseconds per delta, as the server counts the item's audio (a truncate may not pass its count).
    answer.audioMs += Math.floor(samples.length * 1000 / RATE);
    audio.player.port.postMessage({ type: "push", samples });
  },
  "response.output_audio_transcript.delta": (e) => { if (answer) { answer.answer += e.delta; render(); } },
  "response.done": (e) => onResponseDone(e.response),
  "error": (e) => { talk.errors.push(e.error.message); $("timing").textContent = "Server: " + e.error.message; },
};

function onMessage(msg) {
  const event = JSON.parse(msg.data);
  const handler = HANDLERS[event.type];
  if (handler) handler(event);
}

function newTurn(itemId, speechEnd, vadMs) {
  talk.turns.push({ itemId, speechEnd, vadMs, question: "", answer: "", status: "waiting", audioMs: 0,
                    answerItem: null, playStart: null, playEnd: null, interrupted: false, generationEnd: null });
  setState("thinking", "Thinking…");
  render();
}

function onSpeechStarted() {
  setState("hearing you", "Hearing you…");
  if (answer) interrupt(answer);
  snapshot();
}

// Barge-in: silence the answer at once, then tell the server how much of it was heard (the protocol's
// truncate). Hands-free, the server cancels a running answer itself; press to talk, the page asks it to.
function interrupt(turn) {
  turn.interrupted = true;
  turn.interruptedAt = performance.now();
  answer = null;
  audio.player.port.postMessage({ type: "flush" });
  audio.player.port.onmessage = (e) => {
    if (e.data.type === "stopped") {
      turn.playEnd = performance.now();
      turn.played = e.data.played;
      if (turn.answerItem && e.data.wasPlaying) {
        send({ type: "conversation.item.truncate", item_id: turn.answerItem, content_index: 0,
               audio_end_ms: Math.min(Math.floor(e.data.played * 1000 / RATE), turn.audioMs) });
      }
      render();
    }
    audio.player.port.onmessage = (m) => onPlayer(m.data);
  };
  if (mode() === "press" && turn.status === "answering") send({ type: "response.cancel" });
  render();
}

function onResponseDone(response) {
  const turn = talk.turns.find((t) => t.answerItem && response.output.some((o) => o.id === t.answerItem))
    || talk.turns[talk.turns.length - 1];
  if (!turn) return;
  turn.status = response.status;
  turn.generationEnd = performance.now();
  if (answer === turn) {
    audio.player.port.postMessage({ type: "end" });
    if (turn.audioMs === 0) { answer = null; listen(); }
  }
  render();
}

function listen() {
  if (talk.state === "hearing you" || answer) return;
  setState("listening", mode() === "hands-free" ? "Listening: just talk." : "Hold the button (or the space bar) and talk.");
}

// ---- the camera (a Mini-Omni2 server): a frame goes with each question ------------------------------------

async function toggleCamera(on) {
  const video = $("preview");
  if (!on) {
    if (video.srcObject) video.srcObject.getTracks().forEach((t) => t.stop());
    video.srcObject = null;
    video.hidden = true;
    return;
  }
  video.srcObject = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
  video.hidden = false;
  await video.play();
}

function snapshot() {
  const video = $("preview");
  if (!$("camera").checked || !video.srcObject || !video.videoWidth || !ws) return;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  send({ type: "conversation.item.create", item: { type: "message", role: "user",
         content: [{ type: "input_image", image_url: canvas.toDataURL("image/jpeg", 0.85) }] } });
}

// ---- what the page shows -------------------------------------------------------------------------------------

function timingText(turn) {
  if (!turn.playStart) return "";
  const total = Math.round(turn.playStart - turn.speechEnd);
  const vad = turn.vadMs ? ` (${turn.vadMs} ms of it the server's wait for silence)` : "";
  return `first audio ${total} ms after you stopped speaking${vad}, measured in this browser`;
}

function showTiming(turn) { $("timing").textContent = timingText(turn); }

function render() {
  const list = $("transcript");
  list.replaceChildren(...talk.turns.map((turn, i) => {
    const li = document.createElement("li");
    const status = turn.interrupted ? "interrupted" : turn.status === "completed" ? "answered" : turn.status;
    li.innerHTML = `<div><span class="who">You:</span> <span class="q"></span></div>
      <div><span class="who">Mini-Omni:</span> <span class="a"></span></div><div class="note"></div>`;
    li.querySelector(".q").textContent = turn.question ||
      ($("transcribe").checked ? "(transcribing…)" : "(spoken question)");
    li.querySelector(".a").textContent = turn.answer || "…";
    li.querySelector(".note").textContent = [status, timingText(turn)].filter(Boolean).join("; ");
    li.dataset.turn = i;
    return li;
  }));
}

// ---- start, stop, press ----------------------------------------------------------------------------------

async function start() {
  const button = $("talk");
  button.disabled = true;
  try {
    audio = audio || await openAudio();
    const key = $("key").value.trim();
    sessionStorage.setItem(KEY_STORE, key);
    try { ws = await connect(key); } catch (e) { throw new Error(await whyRefused(key)); }
    sentSamples = 0;
    timeline = [];
    ws.onmessage = onMessage;
    ws.onclose = (e) => { if (ws) { stop(); fail(`The conversation ended (${e.reason || "connection closed"}).`); } };
    send(sessionUpdate());
    talk.running = true;
    button.textContent = mode() === "hands-free" ? "Stop" : "Hold to talk";
    button.classList.toggle("active", mode() === "hands-free");
  } catch (e) {
    closeAudio();
    fail(e.name === "NotAllowedError" ? "The browser did not allow the microphone." : e.message);
  } finally {
    button.disabled = false;
  }
}

// A refused WebSocket tells the page nothing; the same checks over HTTP say why.
async function whyRefused(key) {
  const health = await fetch("/health").then((r) => r.json()).catch(() => null);
  if (!health) return "The server cannot be reached.";
  if (health.status !== "ready") return `The model is ${health.status}; try again when it is ready.`;
  const probe = await fetch("/requests/-", { headers: key ? { Authorization: `Bearer ${key}` } : {} });
  if (probe.status === 401) return key ? "The API key is wrong." : "This server needs its API key: open Settings and type it.";
  return "The server refused the conversation (too many open sessions?).";
}

function stop() {
  const socket = ws;
  ws = null;
  sending = false;
  talk.running = false;
  if (answer) audio.player.port.postMessage({ type: "flush" });
  answer = null;
  if (socket) socket.close();
  closeAudio();
  $("talk").textContent = "Start";
  $("talk").classList.remove("active");
  setState("idle", "Press Start, then just talk.");
}

function press() {
  if (!talk.running || mode() !== "press" || sending) return;
  if (answer) interrupt(answer);
  send({ type: "input_audio_buffer.clear" });
  sending = true;
  snapshot();
  $("talk").classList.add("active");
  setState("hearing you", "Hearing you… (release when done)");
}

function release() {
  if (!sending || mode() !== "press") return;
  talk.releasedAt = performance.now();
  setTimeout(() => {
    sending = false;
    $("talk").classList.remove("active");
    send({ type: "input_audio_buffer.commit" });
    send({ type: "response.create" });
  }, PTT_GRACE_MS);
}

async function showServer() {
  const health = await fetch("/health").then((r) => r.json()).catch(() => null);
  if (!health) { $("server").textContent = "Server: not reachable."; return; }
  const model = health.family ? `${health.family} on ${health.device} (${health.mode} mode)` : "loading";
  $("server").textContent = `Server: ${health.status}; ${model}.`;
  $("camera-toggle").hidden = !health.can_see;
}

function init() {
  $("insecure").hidden = window.isSecureContext;
  $("key").value = sessionStorage.getItem(KEY_STORE) || "";
  const button = $("talk");
  button.addEventListener("click", () => {
    if (mode() === "hands-free") talk.running ? stop() : start();
    else if (!talk.running) start();
  });
  button.addEventListener("pointerdown", () => press());
  button.addEventListener("pointerup", () => release());
  button.addEventListener("pointerleave", () => release());
  document.addEventListener("keydown", (e) => { if (e.code === "Space" && !e.repeat && e.target === document.body) { e.preventDefault(); press(); } });
  document.addEventListener("keyup", (e) => { if (e.code === "Space" && e.target === document.body) release(); });
  document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", () => { if (talk.running) stop(); }));
  $("camera").addEventListener("change", (e) => toggleCamera(e.target.checked).catch((err) => fail(`Camera: ${err.message}`)));
  showServer();
}

init();

// The demo page's client: microphone -> AudioWorklet (PCM16 frames) -> the OpenAI Realtime
// transcription protocol at /v1/realtime -> a live transcript. No build step, no dependencies.

// The AudioContext resamples the microphone to this. OpenAI's audio/pcm is 24 kHz only; ours also
// takes 16 kHz, the models' own rate, so nothing is resampled again on the server.
const RATE = 16000;
const FRAME_MS = 100;
const CLOSE_REASONS = {
  1008: "The server refused this session (authentication or a limit)",
  1012: "The server is restarting; press Start to reconnect",
  1013: "The server is busy; try again in a little while",
};

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let session = null; // {ws, context, stream, node}
const items = new Map(); // item_id -> {li, stoppedAt}

$("token").value = params.get("token") || "";
$("device").value = deviceId();
$("language").value = params.get("language") || "";

function deviceId() {
  const given = params.get("device_id");
  if (given) return given;
  let id = localStorage.getItem("speech-serve-device-id");
  if (!id) {
    id = "browser-" + crypto.randomUUID().slice(0, 8);
    localStorage.setItem("speech-serve-device-id", id);
  }
  return id;
}

function status(text, state) {
  $("status").textContent = text;
  $("status").dataset.state = state;
}

function base64(buffer) {
  const bytes = new Uint8Array(buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function micError(err) {
  if (!navigator.mediaDevices) return "The microphone needs a secure page: open it over https or on localhost.";
  if (err.name === "NotAllowedError") return "Microphone access was denied. Allow it in the site settings, then press Start.";
  if (err.name === "NotFoundError") return "No microphone was found.";
  return `The microphone could not start: ${err.message || err.name}`;
}

function sessionUpdate() {
  const transcription = {};
  if ($("language").value) transcription.language = $("language").value;
  return {
    type: "session.update",
    session: {
      type: "transcription",
      audio: {
        input: {
          format: { type: "audio/pcm", rate: RATE },
          transcription,
          turn_detection: { type: "server_vad" },
        },
      },
    },
  };
}

function itemFor(id) {
  let item = items.get(id);
  if (!item) {
    const li = document.createElement("li");
    li.className = "final pending";
    li.dataset.itemId = id;
    li.innerHTML = '<span class="text"></span><span class="meta"></span>';
    $("finals").appendChild(li);
    item = { li, interim: "", stoppedAt: null };
    items.set(id, item);
  }
  return item;
}

function tag(text, kind) {
  const span = document.createElement("span");
  span.className = `tag ${kind}`;
  span.textContent = text;
  return span;
}

// Our extras ride in one object on `.completed` (docs/protocols.md, the Realtime API); strict clients ignore it.
function showCompleted(event) {
  const item = itemFor(event.item_id);
  const extra = event.speech_serve || {};
  if (extra.skipped) { // a blip too short to hold a word: not an utterance
    item.li.remove();
    items.delete(event.item_id);
    $("interim").textContent = "";
    return;
  }
  item.li.classList.remove("pending");
  item.li.querySelector(".text").textContent = event.transcript || "(no words)";
  const meta = item.li.querySelector(".meta");
  meta.replaceChildren();
  for (const [key, value] of [["language", extra.language], ["emotion", extra.emotion], ["event", extra.event]]) {
    if (value) meta.appendChild(tag(value, key));
  }
  const speaker = extra.speaker || {};
  const why = speaker.reason ? ` (${speaker.reason})` : "";
  meta.appendChild(tag(`speaker: ${speaker.label || "unknown"}${why}`, "speaker"));
  // End of speech to result, as the server measured it: VAD endpointing, then the models.
  const lat = extra.latency_ms || {};
  const serverMs = lat.server_ms === undefined ? null : lat.server_ms + (lat.endpoint_ms || 0);
  const clientMs = item.stoppedAt === null ? null : performance.now() - item.stoppedAt;
  const latency = serverMs ?? clientMs;
  if (latency !== null) meta.appendChild(tag(`${Math.round(latency)} ms after speech ended`, "latency"));
  $("interim").textContent = "";
}

function onEvent(event) {
  switch (event.type) {
    case "session.created":
      session.ws.send(JSON.stringify(sessionUpdate()));
      break;
    case "session.updated":
      session.ready = true;
      status("Listening: speak, then pause.", "listening");
      break;
    case "input_audio_buffer.speech_started":
      itemFor(event.item_id);
      $("interim").textContent = "…";
      break;
    case "input_audio_buffer.speech_stopped":
      itemFor(event.item_id).stoppedAt = performance.now();
      break;
    case "conversation.item.input_audio_transcription.delta": {
      const item = itemFor(event.item_id);
      item.interim += event.delta;
      $("interim").textContent = item.interim;
      break;
    }
    case "conversation.item.input_audio_transcription.completed":
      showCompleted(event);
      break;
    case "conversation.item.input_audio_transcription.failed": {
      const item = itemFor(event.item_id);
      item.li.classList.replace("pending", "failed");
      item.li.querySelector(".text").textContent = `(not recognised: ${event.error.message})`;
      break;
    }
    case "error":
      status(`Server: ${event.error.message}`, "error");
      break;
  }
}

async function start() {
  $("start").disabled = true;
  // Created inside the click so the browser lets it run; its rate makes the mic arrive resampled.
  const context = new AudioContext({ sampleRate: RATE });
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true },
    });
  } catch (err) {
    status(micError(err), "error");
    context.close();
    $("start").disabled = false;
    return;
  }
  await context.audioWorklet.addModule("/demo/pcm-worklet.js");
  const node = new AudioWorkletNode(context, "pcm-frames", {
    processorOptions: { frameSamples: (RATE * FRAME_MS) / 1000 },
  });
  context.createMediaStreamSource(stream).connect(node);

  const query = new URLSearchParams({ intent: "transcription", device_id: $("device").value });
  if ($("token").value) query.set("token", $("token").value);
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/v1/realtime?${query}`);
  session = { ws, context, stream, node, ready: false };
  status("Connecting…", "idle");

  node.port.onmessage = ({ data }) => {
    $("level").style.width = `${Math.min(100, Math.round(data.level * 400))}%`;
    if (session && session.ready && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: base64(data.pcm) }));
    }
  };
  ws.onmessage = (message) => onEvent(JSON.parse(message.data));
  ws.onclose = (close) => {
    const reason = CLOSE_REASONS[close.code];
    if (reason) status(close.reason ? `${reason}: ${close.reason}` : reason, "error");
    else if (close.code !== 1000 && close.code !== 1005) status(`Disconnected (${close.code}) ${close.reason}`, "error");
    else if ($("status").dataset.state !== "error") status("Stopped.", "idle");
    teardown();
  };
  ws.onerror = () => status("Could not reach the server.", "error");
  $("stop").disabled = false;
}

function teardown() {
  if (!session) return;
  session.stream.getTracks().forEach((t) => t.stop());
  session.context.close();
  $("level").style.width = "0";
  session = null;
  $("start").disabled = false;
  $("stop").disabled = true;
}

function stop() {
  if (!session) return;
  session.ws.close(1000);
}

$("controls").addEventListener("submit", (e) => e.preventDefault());
$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);

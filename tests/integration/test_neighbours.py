"""One client, one upload or one optional replica must not harm the sessions beside them, on a real
Ray Serve (see conftest.py).

An application of its own on the shared cluster, with the shipped per-session limits (the shared
service lifts `limits.max_audio_rate` so that tests can stream faster than real time) and one
VADHost replica, so that the upload's VAD cut and the live session share one model thread. A live
session streams at real time while beside it (a) an 1800 s file is uploaded, (b) a Realtime
client floods manual turns, (c) a Realtime client floods appends padded around empty audio,
(d) the Speaker replica is killed; meanwhile a new device connects. The live session keeps every
result, in order, with the text of an undisturbed run; the new device is admitted.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from speech_serve.loadtest.soak import Probe, SessionLog, check_session, load_clip, make_reference, stream_session
from speech_serve.settings import StreamSettings
from speech_serve.wire.tokens import device_headers
from tests.support.audio import TWO_UTTERANCES_WAV, read_pcm
from tests.support.service import SECRET, app_beside, device_token

pytestmark = pytest.mark.integration
APP, PREFIX = "neighbours", "/neighbours"
FLOOD_S = 20.0  # how long the flooders keep at it
UPLOAD_S = 1800  # uploads.max_seconds, the longest file a client may send


@pytest.fixture(scope="module")
def neighbours(service, service_args) -> str:
    """ws://host:port/neighbours: the app, deployed beside the shared one; deleted afterwards."""
    args = {k: v for k, v in service_args.items() if k != "limits"}  # the shipped per-session limits
    args["placement"] = {**args["placement"], "VADHost": {"num_cpus": 0, "num_replicas": 1}}
    with app_beside(service, args, APP, PREFIX):
        yield f"ws://{service}{PREFIX}"


def long_file() -> bytes:
    """1800 s of FLAC: the clip at the start, in the middle and at the end, silence between (a few
    hundred kB: bytes do not bound an upload's work, its seconds do)."""
    clip = read_pcm(TWO_UTTERANCES_WAV)
    audio = np.zeros(UPLOAD_S * 16000, dtype=np.int16)
    for at in (0, len(audio) // 2, len(audio) - len(clip)):
        audio[at : at + len(clip)] = clip
    out = io.BytesIO()
    sf.write(out, audio, 16000, format="FLAC")
    return out.getvalue()


def realtime(url: str, device: str):
    headers = device_headers(device, device_token(device))
    ws = connect(f"{url}/v1/realtime?intent=transcription", additional_headers=headers, max_size=None,
                 open_timeout=60)  # fmt: skip
    assert json.loads(ws.recv(timeout=60))["type"] == "session.created"
    return ws


def flood(url: str, device: str, frames, stop: threading.Event) -> dict:
    """Send `frames()` until the server closes (its code) or `stop` (close None: held back, still
    open then); the server's error codes seen."""
    ws = realtime(url, device)
    errors: list[str] = []
    seen: dict = {}

    def read() -> None:
        try:
            for raw in ws:
                message = json.loads(raw)
                if message.get("type") == "error":
                    errors.append(message["error"]["code"])
        except (ConnectionClosed, OSError):
            pass

    def stop_sending() -> None:  # a held-back sender blocks in send: only the socket's end frees it
        stop.wait()
        seen["close"] = ws.close_code
        try:
            ws.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    stopper = threading.Thread(target=stop_sending, daemon=True)
    reader.start(), stopper.start()
    sent = 0
    try:
        while not stop.is_set():
            for frame in frames():
                ws.send(frame)
                sent += 1
    except (ConnectionClosed, OSError):
        pass
    stopper.join(timeout=FLOOD_S * 3)
    reader.join(timeout=10)
    return {"close": seen.get("close"), "errors": errors, "sent": sent}


def manual_turns() -> list[str]:
    """Push-to-talk as fast as the socket takes it: 100 ms of tone, commit."""
    tone = (8000 * np.sin(np.arange(2400) * 2 * np.pi * 440 / 24000)).astype("<i2")
    return [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(tone.tobytes()).decode()}),
            json.dumps({"type": "input_audio_buffer.commit"})]  # fmt: skip


PADDED = json.dumps({"type": "input_audio_buffer.append", "audio": "", "pad": ["x" * 1000] * 62})  # 63 kB


def test_a_live_session_is_unharmed_by_an_upload_two_flooders_and_a_speaker_loss(neighbours):
    url = neighbours
    clip = load_clip(str(TWO_UTTERANCES_WAV), StreamSettings().vad_chunk_ms)
    reference = asyncio.run(make_reference(url, clip, SECRET))
    probe = Probe(APP)
    stop, outcomes = threading.Event(), {}
    update = json.dumps({"type": "session.update", "session": {"type": "transcription",
                         "audio": {"input": {"turn_detection": None}}}})  # fmt: skip

    def beside(name: str, run) -> threading.Thread:
        def target() -> None:
            try:
                outcomes[name] = run()
            except Exception as exc:  # reported by the assertions, not lost in a thread
                outcomes[name] = f"raised {type(exc).__name__}: {exc}"

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    def upload() -> dict:
        headers = device_headers("02:00:00:00:09:01", device_token("02:00:00:00:09:01"))
        r = httpx.post(f"{url.replace('ws://', 'http://')}/v1/audio/transcriptions", headers=headers,
                       data={"response_format": "verbose_json"}, files={"file": ("long.flac", long_file())},
                       timeout=600)  # fmt: skip
        return {"status": r.status_code, "segments": len(r.json().get("segments", [])) if r.is_success else r.text}

    def manual_flood() -> dict:
        first = [True]

        def frames():
            if first[0]:
                first[0] = False
                return [update, *manual_turns()]
            return manual_turns()

        return flood(url, "02:00:00:00:09:02", frames, stop)

    def kill_speaker() -> list[dict]:
        time.sleep(4)  # the live session is under way
        return probe.kill_when_busy({"Speaker": 1}, timeout_s=10)

    def newcomer() -> dict:
        time.sleep(8)  # every flooder is at it
        log = asyncio.run(stream_session(url, clip, 1, SessionLog(), device=77, auth_secret=SECRET))
        return {"results": len(log.results), "closed_early": log.closed_early, "errors": log.errors}

    async def live() -> SessionLog:
        return await stream_session(url, clip, 3, SessionLog(), speed=1.0, device=7, auth_secret=SECRET)

    threads = [
        beside("upload", upload),
        beside("manual turns", manual_flood),
        beside("padded appends", lambda: flood(url, "02:00:00:00:09:03", lambda: [PADDED], stop)),
        beside("speaker killed", kill_speaker),
        beside("newcomer", newcomer),
    ]
    pids = probe.pids(("Ingress",))
    rss_before = probe.rss_mb(pids)
    timer = threading.Timer(FLOOD_S, stop.set)
    timer.start()
    log = asyncio.run(live())
    rss_after = probe.rss_mb(pids)
    print(f"RSS MB before {rss_before}, after {rss_after}")
    stop.set()
    for thread in threads:
        thread.join(timeout=600)
    print(f"beside the live session: {outcomes}")

    check = check_session(log, reference.expected(log.loops))
    assert log.loops == 3 and log.closed_early is None, log.closed_early
    assert check == check | {"lost": 0, "unexpected": 0, "duplicated": 0, "wrong_text": 0, "errors": 0}, check
    assert check["answered"] == check["expected"] and check["in_order"] and check["done"]

    assert outcomes["upload"] == {"status": 200, "segments": 6}, outcomes["upload"]  # the clip's 2, three times
    assert outcomes["newcomer"] == {"results": 2, "closed_early": None, "errors": []}, outcomes["newcomer"]
    assert [k["deployment"] for k in outcomes["speaker killed"]] == ["Speaker"]
    for name in ("manual turns", "padded appends"):  # each closed for what it did
        flooder = outcomes[name]
        assert isinstance(flooder, dict) and flooder["close"] == 1008, (name, flooder)
        assert set(flooder["errors"]) <= {"too_many_messages", "too_far_ahead"} and flooder["errors"], (name, flooder)
    # what the flooders sent did not pile up in the Ingress (+1.9 GB in 20 s before the bound on queued bytes)
    ingress = next(name for name in rss_before if name.startswith("Ingress"))
    assert rss_after[ingress] - rss_before[ingress] < 1000, (rss_before, rss_after)  # a high-water mark: +310 seen

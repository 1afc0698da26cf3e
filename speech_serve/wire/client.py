"""A small client of the service, for examples, the load tools and tests: read a WAV, mint a device
token from the environment, stream a file over the plain protocol (`stream_file`) or the FunASR
protocol (`run_funasr`). It uses only the wire formats (this package), never server internals."""

from __future__ import annotations

import json
import os
import time
import wave

from websockets.sync.client import connect

from speech_serve.wire.tokens import DEFAULT_SECRET_ENV, device_headers, issue_token, url_with_token


def read_wav(path: str) -> tuple[bytes, int]:
    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise SystemExit(f"{path}: need 16-bit mono PCM WAV (convert with: sox in.wav -b 16 -c 1 out.wav)")
        return w.readframes(w.getnframes()), w.getframerate()


def env_token(device_id: str, client_id: str = "", env: str | None = None) -> str | None:
    """A fresh device token when the secret is in the environment (device auth on), else None."""
    secret = os.environ.get(env or DEFAULT_SECRET_ENV)
    return issue_token(secret, client_id, device_id) if secret else None


def stream_file(
    url: str, path: str, frame_ms: int = 60, realtime: bool = False, timeout_s: float = 120,
    speaker_group: str | None = None, device_id: str | None = None, token: str | None = None,
    words: bool = False, hotwords: dict[str, float] | None = None,
) -> list[dict]:  # fmt: skip
    """Stream one file; return the server's result messages in the order received. `words`: each
    result carries its words' times and confidences; `hotwords`: phrases the decoder favours."""
    pcm, rate = read_wav(path)
    frame_bytes = rate * frame_ms // 1000 * 2
    results = []
    with connect(url, additional_headers=device_headers(device_id, token), max_size=None, open_timeout=30) as ws:
        ready = json.loads(ws.recv(timeout=30))
        assert ready["type"] == "ready", ready
        start = {"type": "start", "sample_rate": rate}
        if speaker_group:
            start["speaker_group"] = speaker_group
        if words or hotwords:
            start |= {"words": words, "hotwords": hotwords or {}}
        ws.send(json.dumps(start))
        json.loads(ws.recv(timeout=30))  # ready again, with our sample rate
        for i in range(0, len(pcm), frame_bytes):
            ws.send(pcm[i : i + frame_bytes])
            if realtime:
                time.sleep(frame_ms / 1000)
        ws.send(json.dumps({"type": "end"}))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv(timeout=timeout_s))
            if msg["type"] == "done":
                break
            results.append(msg)
    return results


def run_funasr(
    url: str, wav: str, mode: str = "2pass", chunk_ms: int = 60, realtime: bool = False, itn: bool = True,
    timeout_s: float = 120, speaker_group: str | None = None, device_id: str | None = None,
    token: str | None = None, hotwords: str = "",
) -> list[dict]:  # fmt: skip
    """Stream one file; return every message up to and including the one with `is_end`. `hotwords`: as
    FunASR's own client sends its hotword file, a JSON object string `{"phrase": weight}`."""
    pcm, rate = read_wav(wav)
    stride = rate * chunk_ms // 1000 * 2
    with connect(url_with_token(url, device_id, token), subprotocols=["binary"], max_size=None, open_timeout=30) as ws:
        assert ws.subprotocol == "binary"
        config = {
            "mode": mode, "chunk_size": [5, 10, 5], "chunk_interval": 10, "audio_fs": rate,
            "wav_name": "demo", "wav_format": "pcm", "is_speaking": True, "hotwords": hotwords, "itn": itn,
        }  # fmt: skip
        if speaker_group:  # ours, not FunASR's: whose voiceprints to match
            config["speaker_group"] = speaker_group
        ws.send(json.dumps(config))
        for i in range(0, len(pcm), stride):
            ws.send(pcm[i : i + stride])
            if realtime:
                time.sleep(chunk_ms / 1000)
        ws.send(json.dumps({"is_speaking": False, "is_end": True}))
        messages = []
        deadline = time.monotonic() + timeout_s
        while not messages or not messages[-1].get("is_end"):
            messages.append(json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01))))
    return messages

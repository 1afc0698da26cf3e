"""Simulate a Xiaozhi device: encode a WAV to Opus and stream it like the firmware does.

    python -m examples.xiaozhi_device tests/fixtures/two_utterances.wav
    python -m examples.xiaozhi_device speech.wav --protocol-version 3 --mode manual --realtime
    SPEECH_SERVE_DEVICE_SECRET=... python -m examples.xiaozhi_device speech.wav --device-id aa:bb:cc:dd:ee:ff

auto/realtime: one `listen start`, then every frame; the server's VAD finds the utterances.
manual: push-to-talk around each stretch of speech (found by energy, like a person pressing
the button while talking): `listen start` ... frames ... `listen stop`.
Prints each `stt` the server sends.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import numpy as np
from websockets.sync.client import connect

from speech_serve.wire.client import env_token, read_wav
from speech_serve.wire.opus import OpusEncoder
from speech_serve.wire.xiaozhi import frame_audio


def speech_windows(pcm: np.ndarray, frame_ms: int = 60, gap_ms: int = 600, pad_ms: int = 240) -> list[tuple[int, int]]:
    """Where a person would hold the push-to-talk button: frames above an energy floor,
    merged across short pauses, padded a little. In samples."""
    n = 16 * frame_ms
    rms = np.array([np.sqrt(np.mean(pcm[i : i + n].astype(np.float64) ** 2)) for i in range(0, len(pcm), n)])
    loud = np.flatnonzero(rms > max(200.0, 0.1 * rms.max()))
    windows: list[list[int]] = []
    for f in loud:
        if windows and (f - windows[-1][1]) * frame_ms <= gap_ms:
            windows[-1][1] = f
        else:
            windows.append([f, f])
    pad = pad_ms // frame_ms
    return [(max(a - pad, 0) * n, min((b + 1 + pad) * n, len(pcm))) for a, b in windows]


def run_device(
    url: str,
    wav: str,
    protocol_version: int = 1,
    mode: str = "auto",
    device_id: str = "02:00:00:00:00:01",
    client_id: str | None = None,
    token: str | None = None,
    frame_ms: int = 60,
    realtime: bool = False,
    linger_s: float = 3.0,
    expect: int | None = None,
    hotwords: dict[str, float] | list[str] | None = None,
    words: bool = False,
) -> list[dict]:
    """Stream one WAV; return the server's messages after hello (stt and errors), in order.

    Waits until `expect` stt messages arrived, or `linger_s` passed with none new. `hotwords` and
    `words` ride in the hello (this service's fields beside the firmware's)."""
    pcm, rate = read_wav(wav)
    if rate != 16000:
        raise SystemExit(f"{wav}: the simulator sends 16 kHz Opus; convert with: sox {wav} -r 16000 out.wav")
    pcm = np.frombuffer(pcm, dtype="<i2").astype(np.int16)
    client_id = client_id or str(uuid.uuid4())
    headers = {"Device-Id": device_id, "Client-Id": client_id, "Protocol-Version": str(protocol_version)}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    encoder = OpusEncoder(frame_ms)
    n = encoder.frame_samples
    windows = speech_windows(pcm, frame_ms) if mode == "manual" else [(0, len(pcm))]
    messages: list[dict] = []
    with connect(url, additional_headers=headers, max_size=None, open_timeout=30) as ws:
        audio_params = {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": frame_ms}
        ours = {"hotwords": hotwords} if hotwords else {}
        ws.send(json.dumps({"type": "hello", "version": protocol_version, "transport": "websocket",
                            "features": {"mcp": True}, "audio_params": audio_params, **ours,
                            **({"words": True} if words else {})}))  # fmt: skip
        hello = json.loads(ws.recv(timeout=10))
        if hello.get("type") != "hello":
            return [hello]
        session_id = hello["session_id"]
        sent_ms = 0
        for start, end in windows:
            ws.send(json.dumps({"session_id": session_id, "type": "listen", "state": "start", "mode": mode}))
            for i in range(start, end, n):
                frame = pcm[i : i + n]
                frame = np.concatenate([frame, np.zeros(n - len(frame), dtype=np.int16)])
                for packet in encoder.encode(frame):
                    ws.send(frame_audio(packet, protocol_version, sent_ms))
                sent_ms += frame_ms
                if realtime:
                    time.sleep(frame_ms / 1000)
            if mode == "manual":
                ws.send(json.dumps({"session_id": session_id, "type": "listen", "state": "stop"}))
        deadline = time.monotonic() + linger_s
        while (
            expect is None or sum(m.get("type") == "stt" for m in messages) < expect
        ) and time.monotonic() < deadline:
            try:
                messages.append(json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01))))
                deadline = time.monotonic() + linger_s
            except TimeoutError:
                break
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wav")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/xiaozhi/v1/")
    parser.add_argument("--protocol-version", type=int, choices=[1, 2, 3], default=1)
    parser.add_argument("--mode", choices=["auto", "manual", "realtime"], default="auto")
    parser.add_argument("--device-id", default="02:00:00:00:00:01")
    parser.add_argument("--client-id", default=None)
    parser.add_argument("--frame-ms", type=int, default=60)
    parser.add_argument("--realtime", action="store_true", help="pace frames like a live microphone")
    args = parser.parse_args()
    client_id = args.client_id or str(uuid.uuid4())
    token = env_token(args.device_id, client_id)
    for msg in run_device(args.url, args.wav, args.protocol_version, args.mode, args.device_id, client_id, token,
                          args.frame_ms, args.realtime):  # fmt: skip
        print(json.dumps(msg, ensure_ascii=False))


if __name__ == "__main__":
    main()

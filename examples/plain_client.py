"""Stream a WAV file to the plain JSON protocol and print each result.

    python examples/plain_client.py tests/fixtures/two_utterances.wav
    python examples/plain_client.py speech.wav --url ws://host:8000/v1/stream --realtime
    SPEECH_SERVE_DEVICE_SECRET=... python examples/plain_client.py speech.wav --device-id kitchen-1

With device authentication on (see README "Security"), the client sends a device token minted
from the secret in SPEECH_SERVE_DEVICE_SECRET, as `Authorization: Bearer` with `Device-Id`.

The file is sent as PCM16 frames (60 ms each by default); any sample rate the server lists
is accepted and resampled there.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import wave

from websockets.sync.client import connect

from clients.tokens import DEFAULT_SECRET_ENV, device_headers, issue_token


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
) -> list[dict]:  # fmt: skip
    """Stream one file; return the server's result messages in the order received."""
    pcm, rate = read_wav(path)
    frame_bytes = rate * frame_ms // 1000 * 2
    results = []
    with connect(url, additional_headers=device_headers(device_id, token), max_size=None, open_timeout=30) as ws:
        ready = json.loads(ws.recv(timeout=30))
        assert ready["type"] == "ready", ready
        start = {"type": "start", "sample_rate": rate}
        if speaker_group:
            start["speaker_group"] = speaker_group
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wav")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/stream")
    parser.add_argument("--frame-ms", type=int, default=60)
    parser.add_argument("--realtime", action="store_true", help="pace frames like a live microphone")
    parser.add_argument("--speaker-group", default=None, help="match against this group's voiceprints")
    parser.add_argument("--device-id", default="plain-client-1", help="sent with the token when auth is on")
    args = parser.parse_args()
    token = env_token(args.device_id)
    for msg in stream_file(args.url, args.wav, args.frame_ms, args.realtime, speaker_group=args.speaker_group,
                           device_id=args.device_id, token=token):  # fmt: skip
        print(json.dumps(msg, ensure_ascii=False))


if __name__ == "__main__":
    main()

"""A FunASR-runtime-protocol client: what FunASR's own funasr_wss_client.py sends.

    python examples/funasr_client.py tests/fixtures/two_utterances.wav --mode 2pass --realtime
    python examples/funasr_client.py speech.wav --url ws://host:8000/ --mode offline
    SPEECH_SERVE_DEVICE_SECRET=... python examples/funasr_client.py speech.wav --device-id hall-1

With device authentication on (README "Security") the token goes in the URL
(`?device_id=...&token=...`): FunASR clients cannot always set headers.

(FunASR's own client works too where device authentication is off: `python funasr_wss_client.py
--host 127.0.0.1 --port 8000 --ssl 0 --mode 2pass --audio_in speech.wav`.)
"""

from __future__ import annotations

import argparse
import json
import time

from websockets.sync.client import connect

from clients.tokens import url_with_token
from examples.plain_client import env_token, read_wav


def run_funasr(
    url: str, wav: str, mode: str = "2pass", chunk_ms: int = 60, realtime: bool = False, itn: bool = True,
    timeout_s: float = 120, speaker_group: str | None = None, device_id: str | None = None,
    token: str | None = None,
) -> list[dict]:  # fmt: skip
    """Stream one file; return every message up to and including the one with `is_end`."""
    pcm, rate = read_wav(wav)
    stride = rate * chunk_ms // 1000 * 2
    with connect(url_with_token(url, device_id, token), subprotocols=["binary"], max_size=None, open_timeout=30) as ws:
        assert ws.subprotocol == "binary"
        config = {
            "mode": mode, "chunk_size": [5, 10, 5], "chunk_interval": 10, "audio_fs": rate,
            "wav_name": "demo", "wav_format": "pcm", "is_speaking": True, "hotwords": "", "itn": itn,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wav")
    parser.add_argument("--url", default="ws://127.0.0.1:8000/")
    parser.add_argument("--mode", choices=["offline", "online", "2pass"], default="2pass")
    parser.add_argument("--realtime", action="store_true")
    parser.add_argument("--device-id", default="funasr-client-1", help="sent with the token when auth is on")
    args = parser.parse_args()
    token = env_token(args.device_id)
    for msg in run_funasr(args.url, args.wav, args.mode, realtime=args.realtime, device_id=args.device_id, token=token):
        print(json.dumps(msg, ensure_ascii=False))


if __name__ == "__main__":
    main()

"""A FunASR-runtime-protocol client: what FunASR's own funasr_wss_client.py sends.

    python -m examples.funasr_client tests/fixtures/two_utterances.wav --mode 2pass --realtime
    python -m examples.funasr_client speech.wav --url ws://host:8000/ --mode offline
    SPEECH_SERVE_DEVICE_SECRET=... python -m examples.funasr_client speech.wav --device-id hall-1

With device authentication on (docs/security.md) the token goes in the URL
(`?device_id=...&token=...`): FunASR clients cannot always set headers.

(FunASR's own client works too where device authentication is off: `python funasr_wss_client.py
--host 127.0.0.1 --port 8000 --ssl 0 --mode 2pass --audio_in speech.wav`.)
"""

from __future__ import annotations

import argparse
import json

from speech_serve.wire.client import env_token, run_funasr


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

"""Stream a WAV file to the plain JSON protocol and print each result.

    python -m examples.plain_client tests/fixtures/two_utterances.wav
    python -m examples.plain_client speech.wav --url ws://host:8000/v1/stream --realtime
    SPEECH_SERVE_DEVICE_SECRET=... python -m examples.plain_client speech.wav --device-id kitchen-1

With device authentication on (docs/security.md), the client sends a device token minted
from the secret in SPEECH_SERVE_DEVICE_SECRET, as `Authorization: Bearer` with `Device-Id`.

The file is sent as PCM16 frames (60 ms each by default); any sample rate the server lists
is accepted and resampled there.
"""

from __future__ import annotations

import argparse
import json

from speech_serve.wire.client import env_token, stream_file


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

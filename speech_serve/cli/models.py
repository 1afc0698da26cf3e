"""Build the local test models ahead of time, or show where each model would come from.

    speech-serve models build --size full        # SenseVoice 234 M params + ERes2NetV2
    speech-serve models build --size tiny --speaker campplus
    speech-serve models resolve                  # where each model would come from with default settings
"""

from __future__ import annotations

import argparse
import logging
import time

from speech_serve.replicas.models import resolve_models, test_model_dir
from speech_serve.replicas.models.build import build_sensevoice, build_speaker, ensure_built
from speech_serve.settings import ModelSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="speech-serve models", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build random-weight SenseVoice and speaker models")
    build.add_argument("--size", choices=["tiny", "full"], default="tiny")
    build.add_argument("--speaker", choices=["eres2netv2", "campplus"], default=ModelSettings().speaker_arch)
    build.add_argument("--cache-dir", default=ModelSettings().cache_dir)
    sub.add_parser("resolve", help="print where each model comes from with default settings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "resolve":
        resolved = resolve_models(ModelSettings())
        for source in (resolved.vad, resolved.asr, resolved.speaker):
            print(f"{source.role:8s} {source.describe()}")
        return
    settings = ModelSettings(test_model_size=args.size, speaker_arch=args.speaker, cache_dir=args.cache_dir)
    for role, builder in (
        ("asr", lambda out: build_sensevoice(out, args.size)),
        ("speaker", lambda out: build_speaker(out, args.speaker, args.size)),
    ):
        target = test_model_dir(settings, role)
        started = time.monotonic()
        print(f"building {role} -> {target} ...", flush=True)
        ensure_built(target, builder)
        print(f"  ready in {time.monotonic() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()

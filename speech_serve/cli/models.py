"""Fetch the real models ahead of time, build the local test models, or show where each model comes from.

    speech-serve models fetch --config config/production.yaml   # download + verify into MODELSCOPE_CACHE
    speech-serve models fetch --endpoint https://hf-mirror.example --load   # another hub endpoint; load each
    speech-serve models build --size full        # SenseVoice 234 M params + ERes2NetV2
    speech-serve models build --size tiny --speaker campplus
    speech-serve models resolve [--config FILE]  # where each model would come from with those settings

`fetch` downloads what the settings resolve (models.hub, models.<role>.hub_id; a model with an
explicit path is only checked there) into `<cache>/models/<hub id>`, where the service looks first.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from speech_serve.replicas.models import hub_cache_root, resolve_models, test_model_dir
from speech_serve.replicas.models.build import build_sensevoice, build_speaker, ensure_built
from speech_serve.replicas.models.fetch import HUBS, FetchError, fetch_models
from speech_serve.settings import AppSettings, ModelSettings


def model_settings(config: str | None) -> ModelSettings:
    """The `models` section of a config or overlay (merged onto its base), or the defaults."""
    if config is None:
        return ModelSettings()
    from speech_serve.cli.profile import load

    apps = load(config).get("applications") or [{}]
    return AppSettings(**(apps[0].get("args") or {})).models


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
    resolve = sub.add_parser("resolve", help="print where each model comes from")
    resolve.add_argument("--config", help="a config or overlay whose models section to use (default: the defaults)")
    fetch = sub.add_parser("fetch", help="download the real models into the cache and verify them")
    fetch.add_argument("--config", help="a config or overlay whose models section to use (default: the defaults)")
    fetch.add_argument("--cache-dir", type=Path, help="default: MODELSCOPE_CACHE (~/.cache/modelscope/hub)")
    fetch.add_argument("--endpoint", help="the hub's URL (default: the client's: MODELSCOPE_DOMAIN, HF_ENDPOINT)")
    fetch.add_argument("--load", action="store_true", help="also load each model in FunASR on CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "fetch":
        settings = model_settings(args.config)
        try:
            fetch_models(settings, args.cache_dir or hub_cache_root(), HUBS[settings.hub](args.endpoint), args.load,
                         say=lambda line: print(line, flush=True))  # fmt: skip
        except FetchError as exc:
            raise SystemExit(f"models fetch: {exc}") from None
        return
    if args.command == "resolve":
        resolved = resolve_models(model_settings(args.config))
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

"""The pipeline bench (loadtest/bench_pipeline.py) runs both halves with one set of settings: a
profile's, or serve.yaml's defaults at --size and --threads."""

from pathlib import Path

from speech_serve.loadtest.bench_pipeline import app_args
from speech_serve.settings import AsrSettings, SpeakerSettings

CONFIG = Path(__file__).parents[3] / "config"


def test_without_a_profile_the_bench_takes_the_size_and_threads_asked_for():
    assert app_args(None, "tiny", 1) == {"models": {"test_model_size": "tiny"}, "asr": {"threads": 1},
                                         "speaker": {"threads": 1}}  # fmt: skip


def test_a_profile_gives_its_models_sensevoice_vad_and_speaker_settings():
    args = app_args(CONFIG / "capacity.yaml", "tiny", 2)
    assert args["models"]["test_model_size"] == "full"  # the profile's, not --size
    asr = AsrSettings(**args.get("asr", {}))
    assert asr.quantize == "auto" and asr.threads is None  # the defaults: int8 on CPU, the builder's threads
    assert SpeakerSettings(**args["speaker"]).enabled is False and args["vad"]["max_end_silence_ms"] == 800

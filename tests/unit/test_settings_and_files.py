import json

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from speech_serve.ingress import files as openai_files
from speech_serve.ingress.audio import AudioTooLongError, StreamResampler, decode_file, resample
from speech_serve.messages import AudioFormatError, SpeakerInfo, UtteranceResult
from speech_serve.settings import AppSettings, Placement


def test_the_shipped_config_parses_into_settings():
    with open("config/serve.yaml") as f:
        config = yaml.safe_load(f)
    (app,) = config["applications"]
    assert app["import_path"] == "speech_serve.app:build_app"
    settings = AppSettings(**app["args"])
    assert settings.ingress.vad_chunk_ms >= 120
    names = {d["name"] for d in app["deployments"]}
    assert names == {"Ingress", "VADHost", "SenseVoice", "Speaker"}


def test_unknown_settings_are_rejected():
    with pytest.raises(ValidationError):
        AppSettings(ingress={"vad_chunk_msec": 100})


def test_gpu_fraction_only_where_the_cluster_has_gpus():
    p = Placement(num_cpus=1, num_gpus=0.25)
    assert p.actor_options(cluster_has_gpu=True) == {"num_cpus": 1, "num_gpus": 0.25}
    assert p.actor_options(cluster_has_gpu=False) == {"num_cpus": 1}


def test_custom_resources_steer_a_replica_and_use_gpus_overrides_the_cluster_probe():
    from speech_serve.app import gpus_apply

    p = Placement(num_cpus=1, resources={"speech_cpu": 0.01})
    assert p.actor_options(cluster_has_gpu=False) == {"num_cpus": 1, "resources": {"speech_cpu": 0.01}}
    assert gpus_apply(AppSettings()) is False  # auto, and no Ray here: no GPUs
    assert gpus_apply(AppSettings(use_gpus="always")) is True  # KubeRay: GPU nodes come later
    assert gpus_apply(AppSettings(use_gpus="never")) is False
    with pytest.raises(ValidationError):
        AppSettings(use_gpus="yes")


def _result(i, text, lang):
    return UtteranceResult(
        session_id="f", index=i, start_ms=i * 1000, end_ms=i * 1000 + 500, text=text, language=lang,
        emotion=None, event=None, raw_text=text, speaker=SpeakerInfo(), models="test",
    )  # fmt: skip


def test_openai_shapes():
    results = [_result(0, "hello", "en"), _result(1, "world", "en")]
    body, media = openai_files.render("json", results, 2.0, "test")
    assert media == "application/json" and json.loads(body) == {"text": "hello world", "models": "test"}
    body, media = openai_files.render("text", results, 2.0, "test")
    assert media.startswith("text/plain") and body == "hello world\n"
    verbose = json.loads(openai_files.render("verbose_json", results, 2.0, "test")[0])
    assert verbose["language"] == "en" and verbose["duration"] == 2.0
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in verbose["segments"]] == [
        (0, 0.0, 0.5, "hello"),
        (1, 1.0, 1.5, "world"),
    ]
    with pytest.raises(openai_files.TranscriptionRequestError, match="srt"):
        openai_files.check_response_format("srt")


def test_decode_file_resamples_to_16k(tmp_path):
    import soundfile as sf

    t = np.arange(48000) / 48000
    path = tmp_path / "tone.wav"
    sf.write(path, (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16), 48000)
    pcm, duration = decode_file(path.read_bytes(), max_seconds=60)
    assert duration == pytest.approx(1.0) and abs(len(pcm) - 16000) <= 2 and pcm.dtype == np.int16
    with pytest.raises(AudioFormatError):
        decode_file(b"this is not audio", max_seconds=60)
    with pytest.raises(AudioTooLongError, match="longer than 0.5 s"):
        decode_file(path.read_bytes(), max_seconds=0.5)


def test_resample_identity_and_ratio():
    pcm = np.zeros(800, dtype=np.int16)
    assert resample(pcm, 16000) is pcm
    assert len(resample(pcm, 8000)) == 1600


def test_stream_resampler_keeps_length_across_chunks():
    t = np.arange(48000 * 2) / 48000
    tone = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)
    rs = StreamResampler(48000)
    out = [rs(tone[i : i + 2880]) for i in range(0, len(tone), 2880)]  # 60 ms frames
    out.append(rs(np.zeros(0, dtype=np.int16), last=True))
    joined = np.concatenate(out)
    assert abs(len(joined) - 32000) <= 2 and joined.dtype == np.int16
    # a clean 300 Hz tone, no clicks at frame boundaries: the biggest sample step stays small
    assert np.abs(np.diff(joined[200:-200].astype(np.int32))).max() < 0.15 * 32767
    passthrough = StreamResampler(16000)
    assert passthrough(tone[:10]) is not None and len(passthrough(tone[:10])) == 10


def test_a_partial_thresholds_map_keeps_the_other_models_defaults():
    from speech_serve.settings import MATCH_THRESHOLDS, VoiceprintSettings

    v = VoiceprintSettings(thresholds={"ge2e": 0.9})
    assert v.threshold("ge2e") == 0.9
    assert v.threshold("eres2netv2") == MATCH_THRESHOLDS["eres2netv2"]  # was a silent 0.7 guess before


def test_a_speaker_model_without_a_threshold_is_a_clear_error():
    from speech_serve.settings import VoiceprintSettings

    with pytest.raises(ValueError, match="voiceprints.thresholds.newnet"):
        VoiceprintSettings().threshold("newnet")
    with pytest.raises(ValueError, match="between 0 and 1"):
        VoiceprintSettings(thresholds={"ge2e": 82})

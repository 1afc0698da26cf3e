"""Config profiles are overlays of config/serve.yaml, merged by speech_serve/cli/profile.py."""

from pathlib import Path

import yaml

from speech_serve.cli.profile import load, merge
from speech_serve.settings import AppSettings

CONFIG = Path(__file__).parents[3] / "config"


def test_mappings_merge_named_lists_merge_by_name_and_the_rest_is_replaced():
    base = {"a": {"x": 1, "y": 2}, "apps": [{"name": "s", "args": {"k": 1}}], "tags": [1, 2]}
    overlay = {"a": {"y": 3}, "apps": [{"name": "s", "args": {"j": 2}}, {"name": "t"}], "tags": [3]}
    assert merge(base, overlay) == {
        "a": {"x": 1, "y": 3},
        "apps": [{"name": "s", "args": {"k": 1, "j": 2}}, {"name": "t"}],
        "tags": [3],
    }
    assert base["a"] == {"x": 1, "y": 2}  # inputs untouched


def test_the_bench_profile_is_serve_yaml_with_full_models():
    overlay = CONFIG / "bench-full.yaml"
    assert len(overlay.read_text().splitlines()) <= 30
    bench, serve = load(overlay), yaml.safe_load((CONFIG / "serve.yaml").read_text())
    args = bench["applications"][0]["args"]
    assert args["models"]["test_model_size"] == "full"
    args["models"]["test_model_size"] = serve["applications"][0]["args"]["models"]["test_model_size"]
    assert bench == serve  # nothing else differs
    AppSettings(**load(overlay)["applications"][0]["args"])  # and it parses


def test_every_profile_merges_into_valid_settings_and_says_only_what_is_a_choice():
    """Each overlay in config/ (chains included: capacity-speaker -> capacity -> serve) parses; the
    capacity profiles choose only the model size, the end silence and the speaker model."""
    overlays = [p for p in CONFIG.glob("*.yaml") if "base" in (yaml.safe_load(p.read_text()) or {})]
    assert {p.name for p in overlays} >= {"bench-full.yaml", "capacity.yaml", "capacity-speaker.yaml",
                                          "multi-node.yaml"}  # fmt: skip
    for overlay in overlays:
        AppSettings(**load(overlay)["applications"][0]["args"])
    capacity = yaml.safe_load((CONFIG / "capacity.yaml").read_text())
    (app,) = capacity["applications"]
    assert set(app) == {"name", "args"} and set(app["args"]) == {"models", "vad", "speaker"}
    merged = AppSettings(**load(CONFIG / "capacity.yaml")["applications"][0]["args"])
    assert merged.models.test_model_size == "full" and merged.vad.max_end_silence_ms == 800
    assert merged.speaker.enabled is False
    assert merged.asr.quantize == "auto" and merged.compute.sessions_per_asr_replica == "measured"
    speaker = AppSettings(**load(CONFIG / "capacity-speaker.yaml")["applications"][0]["args"])
    assert speaker.speaker.enabled and speaker.models.speaker_arch == "campplus"  # the default speaker model


def test_the_multi_node_profile_steers_vad_and_the_models_to_worker_nodes_and_keeps_the_rest():
    args = load(CONFIG / "multi-node.yaml")["applications"][0]["args"]
    placement = AppSettings(**args).placement
    for name in ("VADHost", "SenseVoice", "Speaker"):
        assert placement[name].resources == {"speech_worker": 0.001}
    assert placement["Ingress"].resources == {} and "SessionRegistry" not in placement
    assert placement["SenseVoice"].num_gpus == 0.25 and placement["VADHost"].num_cpus == 0.1  # the defaults'
    retry = AppSettings(**args).retry  # covers a node's replacement, not only a replica's
    assert retry.deadline_s >= 180 and retry.try_timeout_s >= 180


def test_the_effective_config_fills_in_every_default_under_what_the_file_says(capsys):
    from speech_serve.cli.profile import main

    main(["--effective", str(CONFIG / "capacity.yaml")])
    out = capsys.readouterr().out
    assert out.startswith("# the effective configuration of")
    (app,) = yaml.safe_load(out)["applications"]
    assert app["args"]["vad"]["max_end_silence_ms"] == 800  # the file's
    assert app["args"]["asr"]["dither"] == 0.0  # a default
    assert app["args"]["limits"]["max_frames_per_s"] == 200.0 and app["args"]["speaker"]["enabled"] is False
    vad = next(d for d in app["deployments"] if d["name"] == "VADHost")
    assert vad["max_ongoing_requests"] == 1000  # the code's table ...
    assert vad["autoscaling_config"]["downscale_delay_s"] == 120  # ... under the file's entry
    sense_voice = next(d for d in app["deployments"] if d["name"] == "SenseVoice")
    assert sense_voice["max_ongoing_requests"] == 64
    assert {d["name"] for d in app["deployments"]} == {"Ingress", "VADHost", "SenseVoice", "Speaker", "SessionRegistry"}


def test_the_production_profile_requires_real_models_serves_the_lan_with_auth_and_keeps_secrets_out():
    config = load(CONFIG / "production.yaml")
    settings = AppSettings(**config["applications"][0]["args"])
    assert settings.models.require_real_models and not settings.models.allow_test_models
    assert config["http_options"]["host"] == "0.0.0.0" and settings.security.device_auth == "on"
    assert settings.voiceprints.store == "env:SPEECH_SERVE_VOICEPRINT_STORE"  # a Postgres URL, read from that variable
    assert config["logging_config"] == {"encoding": "JSON"} and settings.logging.encoding == "JSON"
    assert settings.security.device_secret_env == "SPEECH_SERVE_DEVICE_SECRET"  # names, never values
    text = (CONFIG / "production.yaml").read_text()
    assert "://" not in yaml.safe_dump(yaml.safe_load(text)) and len(text.splitlines()) <= 30

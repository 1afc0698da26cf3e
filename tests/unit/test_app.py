"""The builder's wiring of the host plan into each deployment's options."""

from pathlib import Path

from speech_serve.app import deployment_options, planned
from speech_serve.settings import AppSettings
from speech_serve.sizing import Node, plan_host

ROOT = Path(__file__).parents[2]


def test_the_plan_fills_threads_reservations_and_replica_counts():
    settings = AppSettings(speaker={"enabled": False})
    plan = plan_host([Node(cpus=2, memory_gib=16)], settings, gpus=False)
    built = planned(settings, plan)
    assert built.asr.threads == 1 and built.placement["SenseVoice"].num_cpus == 0.85
    options = deployment_options("SenseVoice", built, plan, gpu=False)
    assert options["ray_actor_options"] == {"num_cpus": 0.85}
    assert options["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 2, "initial_replicas": 2}
    assert options["user_config"] and options["max_ongoing_requests"]  # the code's table underneath
    speaker = deployment_options("Speaker", built, plan, gpu=False)  # off: one idle replica, nothing reserved
    assert speaker["ray_actor_options"] == {"num_cpus": 0.0} and speaker["autoscaling_config"]["max_replicas"] == 1


def test_explicit_values_are_kept_and_a_fixed_count_wins():
    settings = AppSettings(asr={"threads": 3}, placement={"SenseVoice": {"num_cpus": 0.5, "num_replicas": 2}})
    plan = plan_host([Node(cpus=8, memory_gib=64)], settings, gpus=False)
    built = planned(settings, plan)
    assert built.asr.threads == 3 and built.placement["SenseVoice"].num_cpus == 0.5
    options = deployment_options("SenseVoice", built, plan, gpu=False)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options


def test_without_ray_nothing_is_planned_and_replicas_start_as_configured():
    settings = AppSettings()
    plan = plan_host([], settings, gpus=False)
    built = planned(settings, plan)
    assert built.asr.threads == 1 and built.placement["SenseVoice"].num_cpus == 0.0
    assert "autoscaling_config" not in deployment_options("SenseVoice", built, plan, gpu=False)


def test_json_logs_reach_every_deployment_and_the_internal_ones_keep_their_access_log_off():
    settings = AppSettings(logging={"encoding": "JSON"})
    plan = plan_host([Node(cpus=2, memory_gib=16)], settings, gpus=False)
    built = planned(settings, plan)
    for name in ("Ingress", "VADHost", "SenseVoice", "Speaker", "SessionRegistry"):
        assert deployment_options(name, built, plan, gpu=False)["logging_config"]["encoding"] == "JSON", name
    assert deployment_options("VADHost", built, plan, gpu=False)["logging_config"]["enable_access_log"] is False
    plain = planned(AppSettings(), plan)  # unset: Serve's own default, nothing written
    assert "logging_config" not in deployment_options("Ingress", plain, plan, gpu=False)


def test_the_production_profile_without_real_models_refuses_to_build_naming_them(tmp_path, monkeypatch):
    import pytest

    from speech_serve import app
    from speech_serve.cli.profile import load
    from speech_serve.replicas import models

    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path))  # an empty cache
    monkeypatch.setattr(models, "hub_reachable", lambda hub, timeout_s: False)  # this machine reaches no hub
    args = load(ROOT / "config" / "production.yaml")["applications"][0]["args"]
    with pytest.raises(models.ModelUnavailableError) as err:
        app.build_app(args)
    assert f"asr model 'iic/SenseVoiceSmall': models.asr.path is not set; not in the ModelScope cache ({tmp_path}" in (
        str(err.value))
    assert "speaker model 'iic/speech_campplus_sv_zh-cn_16k-common'" in str(err.value)

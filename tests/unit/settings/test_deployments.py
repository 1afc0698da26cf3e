"""Placement and the deployment options (settings/deployments.py)."""

import pytest
from pydantic import ValidationError

from speech_serve.settings import AppSettings, Placement


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


def test_serve_yaml_deployments_hold_what_serve_needs_there_and_restate_nothing_of_the_table():
    from pathlib import Path

    import yaml

    from speech_serve.settings import DEFAULT_DEPLOYMENT_OPTIONS

    (app,) = yaml.safe_load(Path("config/serve.yaml").read_text())["applications"]
    restated = {f"{d['name']}.{key}" for d in app["deployments"] for key, value in d.items()
                if DEFAULT_DEPLOYMENT_OPTIONS.get(d["name"], {}).get(key, KeyError) == value}  # fmt: skip
    assert restated == set()
    assert {key for d in app["deployments"] for key in d} <= {"name", "autoscaling_config", "user_config"}
    vad = next(d for d in app["deployments"] if d["name"] == "VADHost")["autoscaling_config"]["policy"]
    assert "policy_kwargs" not in vad  # its target is vad.sessions_per_replica, reported by the replicas

"""`speech-serve plan`: devices per node from a sweep's levels, a fleet's nodes and GPUs, and an
overlay that deploys it (on Ray nodes, or on KubeRay)."""

import json

import pytest
import yaml

from speech_serve.cli import plan
from speech_serve.cli.kuberay import render
from speech_serve.cli.profile import load
from speech_serve.loadtest.sweep import Level
from speech_serve.settings import AppSettings


def level(offered, admitted, lost, p95, nodes=None) -> Level:
    return Level(offered=offered, admitted=admitted, refused=offered - admitted, utterances=8 * admitted, lost=lost,
                 p50_s=p95 / 2, p95_s=p95, wall_s=40.0, cores={}, connection_errors=0, error_frames=0,
                 drained=True, nodes=nodes)  # fmt: skip


NODE = {"cpus": 2.0, "gpus": 0.0, "replicas": {"SenseVoice": 2}}
WORKLOAD = {"protocol": "funasr", "together": True, "speech_share": 0.61, "speaker": False}


def capacity() -> dict:
    one_node = [{"node_id": "a", "ip": "x", "head": True, "cpus": 2, "gpus": 0, "replicas": {"SenseVoice": 2}}]
    levels = [level(1, 1, 0, 1.1, one_node), level(16, 16, 0, 1.4, one_node), level(24, 24, 0, 2.4, one_node),
              level(32, 24, 0, 2.6, one_node), level(40, 40, 3, 2.0, one_node)]  # fmt: skip
    return plan.node_capacity(levels, NODE, WORKLOAD)


def test_a_node_holds_the_most_devices_of_a_level_on_target_with_nothing_lost():
    held = capacity()["devices_per_node_at_p95"]
    assert held == {"1": 0, "1.5": 16, "2": 16, "2.5": 24, "3": 24}  # the 40 lost utterances: never counted
    assert "1.5 s: 16" in plan.held_line(capacity())


def test_a_fleet_is_the_devices_over_what_a_node_holds_rounded_up_plus_spares():
    fleet = plan.plan_fleet(capacity(), devices=500, target_s=1.5)
    assert (fleet.per_node, fleet.nodes, fleet.from_level) == (16, 32, 16)  # 500 / 16 = 31.25
    assert fleet.replicas == {"SenseVoice": 64, "Ingress": 5, "VADHost": 10} and fleet.max_sessions == 512
    spared = plan.plan_fleet(capacity(), devices=500, target_s=2.5, spare=1)
    assert spared.nodes == 22 and spared.max_sessions == 24 * 21  # 500 / 24 = 20.8, + 1 spare
    with pytest.raises(SystemExit, match="no level of this sweep held"):
        plan.plan_fleet(capacity(), devices=500, target_s=1.0)


def test_the_overlay_deploys_the_fleet_on_ray_nodes_and_on_kuberay(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / plan.CAPACITY_FILE).write_text(json.dumps(capacity()))
    out = tmp_path / "fleet.yaml"
    plan.main(["--devices", "500", "--p95", "1.5", "--from", str(sweep), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "500 devices at p95 <= 1.5 s: 32 node(s)" in printed and "wrote" in printed
    merged = load(out)["applications"][0]
    settings = AppSettings(**merged["args"])
    assert settings.admission.max_sessions_total == 512
    assert settings.placement["SenseVoice"].resources == {"speech_worker": 0.001}  # multi-node.yaml's, underneath
    scaled = {d["name"]: d["autoscaling_config"] for d in merged["deployments"] if "autoscaling_config" in d}
    assert scaled["SenseVoice"] == {"min_replicas": 64, "max_replicas": 64}

    kube = tmp_path / "kube.yaml"
    plan.main(["--devices", "500", "--p95", "1.5", "--from", str(sweep), "--kuberay", "--out", str(kube)])
    manifest = list(yaml.safe_load_all(render(kube)))
    cluster = next(d for d in manifest if d.get("kind") == "RayService")["spec"]["rayClusterConfig"]
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["maxReplicas"] >= 64 // 4  # the models' replicas packed into GPU pods


def test_no_sweep_no_plan(tmp_path):
    with pytest.raises(SystemExit, match="capacity.json not found"):
        plan.main(["--devices", "5", "--p95", "1", "--from", str(tmp_path)])

"""The builder's host plan (speech_serve/sizing.py) for 2, 8 and 16 cores, with and without GPUs:
model replicas, threads, reservations and precision, and what the config pins instead."""

import pytest

from speech_serve.settings import AppSettings
from speech_serve.sizing import Node, plan_host

GIB = 2**30


def cpu_node(cpus: int, memory_gib: float = 64) -> Node:
    return Node(cpus=cpus, memory_gib=memory_gib)


def reserved(plan, settings: AppSettings, per_node: bool = True) -> float:
    """CPUs the plan reserves on one node, the light deployments included."""
    light = sum(settings.placement[name].num_cpus for name in ("Ingress", "VADHost"))
    models = [m for m in (plan.asr, plan.speaker) if m is not None]
    return light + sum(m.num_cpus * m.replicas / (plan.model_nodes if per_node else 1) for m in models)


@pytest.mark.parametrize("cpus", [2, 8, 16])
@pytest.mark.parametrize("speaker", [True, False])
def test_on_cpu_single_thread_replicas_fill_the_node_and_never_overbook_it(cpus, speaker):
    settings = AppSettings(speaker={"enabled": speaker})
    plan = plan_host([cpu_node(cpus)], settings, gpus=False)
    assert plan.quantize == "int8" and plan.asr.device == "cpu"
    assert plan.asr.threads == 1 and plan.asr.replicas >= 2  # two 1-thread replicas beat one of 2 threads
    assert (plan.speaker is not None) == speaker
    threads = plan.asr.replicas * plan.asr.threads + (plan.speaker.replicas if speaker else 0)
    assert cpus - 1 <= threads <= cpus + 1  # about one model thread per core: few idle, few waiting
    assert reserved(plan, settings) <= cpus  # reservations fit: an extra replica would wait, not stack
    assert reserved(plan, settings) >= 0.9 * cpus
    auto = plan.asr.autoscaling()
    assert auto["min_replicas"] == auto["max_replicas"] == plan.asr.replicas  # fixed per node on CPU
    assert any("SenseVoice" in r for r in plan.reasons) and "int8" in plan.describe()


def test_the_two_core_plan_is_what_the_sweep_measured():
    off = plan_host([cpu_node(2, 16)], AppSettings(speaker={"enabled": False}), gpus=False)
    assert (off.asr.replicas, off.asr.threads, off.asr.num_cpus) == (2, 1, 0.85)
    on = plan_host([cpu_node(2, 16)], AppSettings(), gpus=False)
    assert (on.asr.replicas, on.speaker.replicas, on.speaker.threads) == (2, 1, 1)


def test_short_memory_gives_fewer_replicas_with_more_threads():
    plan = plan_host([cpu_node(16, memory_gib=10)], AppSettings(speaker={"enabled": False}), gpus=False)
    assert plan.asr.replicas == 4 and plan.asr.threads == 3  # 10 GiB holds four 2.5 GiB replicas
    assert any("memory fits 4" in r for r in plan.reasons)


def test_replicas_go_only_to_nodes_offering_the_placement_resources_and_count_per_node():
    placement = {"SenseVoice": {"resources": {"speech_worker": 0.001}}}
    settings = AppSettings(speaker={"enabled": False}, placement=placement)
    head = Node(cpus=2, memory_gib=16)
    workers = [Node(cpus=8, memory_gib=64, resources=frozenset({"speech_worker"})) for _ in range(2)]
    plan = plan_host([head, *workers], settings, gpus=False)
    assert plan.node.cpus == 8 and plan.model_nodes == 2
    per_node = plan_host([workers[0]], settings, gpus=False).asr.replicas
    assert plan.asr.replicas == 2 * per_node
    none_yet = plan_host([head], settings, gpus=False)
    assert none_yet.asr.replicas is None and none_yet.asr.autoscaling() is None  # the YAML's counts stand


@pytest.mark.parametrize("cpus,gpus", [(8, 1), (16, 1), (16, 4)])
def test_on_gpu_fp32_fractions_and_a_range_from_one_per_gpu(cpus, gpus):
    plan = plan_host([Node(cpus=cpus, gpus=gpus, memory_gib=64)], AppSettings(), gpus=True)
    assert plan.quantize == "none" and plan.asr.device == "cuda" and plan.asr.threads == 2
    auto = plan.asr.autoscaling()
    assert auto["min_replicas"] == gpus and auto["max_replicas"] == 4 * gpus  # 0.25 GPU each
    assert plan.speaker.autoscaling()["min_replicas"] == gpus
    assert plan.asr.num_cpus + plan.speaker.num_cpus <= cpus


def test_use_gpus_always_before_any_gpu_node_leaves_the_counts_to_the_config():
    plan = plan_host([Node(cpus=2, memory_gib=16)], AppSettings(use_gpus="always"), gpus=True)
    assert plan.asr.autoscaling() is None and plan.quantize == "none"
    assert "no GPU node up yet" in plan.describe()


def test_what_the_config_states_wins():
    settings = AppSettings(asr={"threads": 2, "quantize": "none"}, speaker={"enabled": False},
                           placement={"SenseVoice": {"num_cpus": 1.5}})  # fmt: skip
    plan = plan_host([cpu_node(8)], settings, gpus=False)
    assert plan.asr.threads == 2 and plan.quantize == "none" and plan.asr.num_cpus == 1.5
    fixed = AppSettings(placement={"SenseVoice": {"num_replicas": 3}})
    assert plan_host([cpu_node(8)], fixed, gpus=False).asr.autoscaling() is None  # placement's count stands


def test_nodes_from_ray():
    node = Node.from_ray({"Resources": {"CPU": 4.0, "GPU": 1.0, "memory": 8 * GIB, "object_store_memory": 1.0,
                                        "node:10.0.0.1": 1.0, "speech_worker": 1000.0,
                                        "accelerator_type:H100": 1.0}})  # fmt: skip
    assert node == Node(4.0, 1.0, 8.0, frozenset({"speech_worker"}))

"""The capacity sweep's arithmetic: which level counts as held, the speech share, the report."""

import time

import numpy as np

from speech_serve.loadtest.records import Clip
from speech_serve.loadtest.sweep import (
    TRANSPORT_KINDS,
    Level,
    SweepConfig,
    held_devices,
    host_busy_seconds,
    parse_asr_precision,
    render,
    speech_share,
)


def level(offered, admitted, lost, p95, cores=None) -> Level:
    return Level(offered=offered, admitted=admitted, refused=offered - admitted, utterances=8 * admitted, lost=lost,
                 p50_s=p95 and p95 / 2, p95_s=p95, wall_s=40.0, cores=cores or {}, connection_errors=0,
                 error_frames=0, drained=True)  # fmt: skip


def test_held_is_the_most_admitted_devices_on_target_with_nothing_lost():
    levels = [level(1, 1, 0, 1.2), level(4, 4, 0, 2.9), level(8, 8, 0, 3.4), level(12, 12, 3, 2.0)]
    assert held_devices(levels, 3.0) == 4  # 8 is over the target, 12 lost utterances
    assert held_devices(levels, 3.5) == 8
    # Offered more than the cap: the admitted ones count, the refused do not.
    assert held_devices([level(16, 9, 0, 2.5)], 3.0) == 9
    assert held_devices([level(2, 2, 1, 1.0)], 3.0) == 0


def test_speech_share_is_mean_clip_over_clip_plus_mean_pause():
    clips = [Clip("a", np.zeros(16000 * 2, dtype=np.int16), None), Clip("b", np.zeros(16000 * 4, dtype=np.int16), None)]
    assert speech_share(clips, (1.0, 3.0)) == 3 / 5


def test_transport_cores_per_device_and_report():
    lv = level(4, 4, 0, 2.0, cores={"proxy": 0.1, "Ingress": 0.2, "VADHost": 0.1, "SenseVoice": 1.2})
    assert lv.cores_per_device(TRANSPORT_KINDS) == 0.1
    assert lv.cores_per_device(TRANSPORT_KINDS, {"proxy": 0.02, "Ingress": 0.02, "SenseVoice": 0.5}) == 0.09
    report = render(SweepConfig(), [lv], {"SenseVoice": 0.01}, {"speech_s_per_s": 6.0, "batch": 8, "threads": 2,
                                                                "model": "test"}, 0.6)  # fmt: skip
    assert "compute bound" in report and "**10.0 devices**" in report
    assert "held at p95 <= 3 s with nothing lost: 4**" in report and "held / bound = **0.40**" in report
    assert report.count("SenseVoice cores") == 1


def test_node_layout_counts_each_nodes_replicas_from_the_state_api():
    from types import SimpleNamespace as NS

    from speech_serve.loadtest.sweep import node_layout

    nodes = [NS(node_id="w" * 28, node_ip="10.0.0.2", is_head_node=False, state="ALIVE", resources_total={"CPU": 8.0}),
             NS(node_id="h" * 28, node_ip="10.0.0.1", is_head_node=True, state="ALIVE", resources_total={"CPU": 2.0}),
             NS(node_id="d" * 28, node_ip="10.0.0.3", is_head_node=False, state="DEAD", resources_total={})]
    actor = lambda node, name, state="ALIVE": NS(node_id=node * 28, name=name, state=state)  # noqa: E731
    actors = [actor("w", "SERVE_REPLICA::speech#SenseVoice#a1"), actor("w", "SERVE_REPLICA::speech#SenseVoice#a2"),
              actor("w", "SERVE_REPLICA::speech#VADHost#v1"), actor("h", "SERVE_REPLICA::speech#Ingress#i1"),
              actor("h", "SERVE_PROXY_ACTOR-hhh"), actor("h", "SERVE_CONTROLLER_ACTOR"),
              actor("w", "SERVE_REPLICA::other#SenseVoice#x", "DEAD")]  # fmt: skip
    layout = node_layout(nodes, actors)
    assert [(n["ip"], n["head"], n["replicas"]) for n in layout] == [
        ("10.0.0.1", True, {"Ingress": 1}),  # the head first; the dead node left out
        ("10.0.0.2", False, {"SenseVoice": 2, "VADHost": 1}),
    ]


def test_devices_per_sensevoice_node_in_the_report():
    two = [{"node_id": "h", "ip": "10.0.0.1", "head": True, "cpus": 2.0, "gpus": 0.0, "replicas": {"Ingress": 1}},
           {"node_id": "w", "ip": "10.0.0.2", "head": False, "cpus": 8.0, "gpus": 1.0,
            "replicas": {"SenseVoice": 2}}]  # fmt: skip
    held, over = level(12, 12, 0, 2.5), level(24, 24, 4, 4.0)
    held.nodes, over.nodes = two, two
    assert (held.asr_nodes, held.per_asr_node) == (1, 12.0)
    assert level(4, 4, 0, 2.0).per_asr_node is None  # no layout (no dashboard): no per-node figure
    report = render(SweepConfig(), [held, over], {}, None, 0.6)
    assert "devices held per SenseVoice node: 12.0** (12 devices, 1 of 2 nodes running SenseVoice" in report
    assert "| 10.0.0.2 |  | 8 | 1 | SenseVoice 2 |" in report


def test_the_bound_is_measured_before_every_level_and_reported_as_the_median(tiny_models, two_utterances):
    """The host's speed drifts: a burst before each level, one model loaded once in a process of its
    own, the median of all batches."""
    from speech_serve.loadtest.sweep import BoundMeter

    clips = [Clip(str(i), two_utterances[i * 8000 : i * 8000 + 16000], None) for i in range(4)]
    meter = BoundMeter(SweepConfig(bound_size="tiny", bound_quantize="none", bound_batch=2, bound_threads=1), clips)
    try:
        firsts = [meter.measure() for _ in range(3)]
    finally:
        meter.close()
    assert not meter._process.is_alive()  # the model's process is gone once the sweep ends
    result = meter.result()
    assert [len(b) for b in result["bursts"]] == [2, 2, 2]  # every whole batch of the corpus, each time
    every = sorted(r for b in result["bursts"] for r in b)
    assert result["speech_s_per_s"] == round((every[2] + every[3]) / 2, 2)
    assert result["min"] == every[0] and result["max"] == every[-1] and all(f > 0 for f in firsts)
    lv = level(4, 4, 0, 2.0)
    lv.bound_before = 6.0
    report = render(SweepConfig(), [lv], {}, {**result, "speech_s_per_s": 6.0}, 0.6)
    assert "median of 6 batches measured before the levels" in report and "**10.0 devices**" in report
    assert report.splitlines()[-3].endswith("| yes | 10.0 |")  # the bound just before this level, in devices


def test_where_the_time_went_per_level():
    from speech_serve.loadtest.records import UtteranceRecord
    from speech_serve.loadtest.sweep import stage_breakdown

    def rec(latency_s, endpoint, vad, asr, model, server):
        r = UtteranceRecord(0, "funasr", 0, "a.wav", None, 2.0, speech_end_t=100.0, result_t=100.0 + latency_s)
        r.stages_ms = {"endpoint_ms": endpoint, "vad_ms": vad, "asr_ms": asr, "asr_model_ms": model,
                       "server_ms": server}  # fmt: skip
        return r

    lost = UtteranceRecord(0, "funasr", 1, "b.wav", None, 2.0, speech_end_t=100.0)
    stages = stage_breakdown([rec(1.5, 700, 20, 600, 500, 650), rec(1.5, 700, 20, 600, 500, 650), lost])
    assert stages == {"endpoint": [700, 700], "vad call": [20, 20], "asr queue": [100, 100],
                      "asr model": [500, 500], "rest": [150, 150]}  # fmt: skip
    lv = level(4, 4, 0, 2.0)
    lv.stages = stages
    report = render(SweepConfig(), [lv], {}, None, 0.6)
    assert "| 4 | 700 / 700 | 20 / 20 | 100 / 100 | 500 / 500 | 150 / 150 |" in report
    assert stage_breakdown([lost]) == {}


def test_the_bound_runs_the_precision_and_kernels_the_service_reports():
    from speech_serve.replicas.models import resolve_models  # the service's side of the string
    from speech_serve.settings import ModelSettings

    models = resolve_models(ModelSettings(test_model_size="tiny"), hub_up=False)
    for quantize, engine in [("int8", "onednn"), ("int8", "x86"), ("none", "onednn")]:
        described = models.summary(quantize, engine).sources["asr"]
        assert parse_asr_precision(described) == (quantize, engine if quantize == "int8" else "x86")
    assert parse_asr_precision("SenseVoice at /m [int8 on CPU]") == ("int8", "x86")  # an older service: torch's default


def test_the_report_says_where_the_hosts_cpu_went_and_whether_the_speaker_ran():
    lv = level(8, 8, 0, 2.0, cores={"SenseVoice": 0.8, "Ingress": 0.2, "VADHost": 0.3})
    lv.load_tool_cores, lv.host_busy_cores = 0.15, 1.85
    report = render(SweepConfig(), [lv], {}, None, 0.6)
    assert "this host was busy 1.85 of" in report
    assert ("SenseVoice 0.80, the rest of the service 0.50, the load tool 0.15, everything else (Ray, the OS) 0.40"
            in report)
    assert "| 0.15 | 1.85 |" in report and "speaker model ran" not in report  # speaker off: no column
    # SenseVoice's ceiling: 8 devices on 0.8 cores; the rest took 1.05, leaving 0.95 of 2 cores
    assert lv.ceiling(2) == 9.5 and lv.ceiling(4) == 29.5
    assert level(8, 8, 0, 2.0).ceiling(2) is None  # SenseVoice's cores not known
    lv.speaker_ran = 50
    report = render(SweepConfig(), [lv], {}, None, 0.6)
    assert "speaker model ran" in report and "| 50 of 64 |" in report
    lines = report.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| offered | admitted"))
    assert lines[header].count("|") == lines[header + 1].count("|") == lines[header + 2].count("|")
    first = host_busy_seconds()
    assert first is not None
    deadline = time.monotonic() + 30  # a bound on the loop, not a timing assertion
    while host_busy_seconds() <= first and time.monotonic() < deadline:
        sum(range(100_000))  # some CPU: the host's busy time only grows
    assert host_busy_seconds() > first


def test_the_report_gives_sensevoices_ceiling_on_the_cores_the_rest_left(monkeypatch):
    import speech_serve.loadtest.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "host_cpus", lambda: 2)
    lv = level(32, 32, 0, 2.8, cores={"SenseVoice": 1.08, "Ingress": 0.27, "VADHost": 0.19})
    lv.load_tool_cores, lv.host_busy_cores = 0.09, 1.80
    report = render(SweepConfig(), [lv], {}, {"speech_s_per_s": 32.4, "batch": 8, "threads": 2, "model": "m"}, 0.6)
    assert "**54.0 devices**" in report and "held / bound = **0.59**" in report
    # 2 - (1.80 - 1.08) = 1.28 cores left, at 1.08 / 32 cores per device: 37.9 devices, 0.70 of the bound
    assert "**SenseVoice's ceiling on these cores: 37.9 devices = 0.70 of the bound**" in report
    assert "the 1.28 of 2 cores the rest left it, at the 0.034 cores per device" in report

"""`speech-serve host`: the builder's plan for this machine, and the measured compute cap."""

import json

import yaml

from speech_serve.cli import host
from speech_serve.sizing import Node


def test_this_machine_is_described_as_ray_would_see_it():
    node = host.this_machine()
    assert node.cpus >= 1 and node.gpus == 0 and node.memory_gib > 0


def test_the_plan_is_printed_with_its_reasons(capsys, monkeypatch):
    monkeypatch.setattr(host, "this_machine", lambda: Node(cpus=8, memory_gib=32))
    host.main([])
    out = capsys.readouterr().out
    assert "sized for 8 CPUs" in out and "SenseVoice: 5 replica(s) per node" in out and "int8" in out
    host.main(["--json"])
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["asr"]["replicas"] == 5 and plan["speaker"]["replicas"] == 3


def test_measure_times_the_warm_up_and_derives_the_sessions(capsys, monkeypatch, tmp_path, model_settings, tiny_models):
    monkeypatch.setattr(host, "this_machine", lambda: Node(cpus=2, memory_gib=16))
    config = tmp_path / "c.yaml"
    args = {"models": model_settings.model_dump(), "speaker": {"enabled": False}, "compute": {"warmup_utterance_s": 1}}
    config.write_text(yaml.safe_dump({"applications": [{"name": "speech", "args": args}]}))
    host.main([str(config), "--measure", "--json"])
    measured = json.loads(capsys.readouterr().out)["measured"]
    assert measured["batch_s"] > 0 and measured["replicas"] == 2
    assert measured["sessions"] == 2 * measured["sessions_per_replica"] >= 2
    assert "int8" in measured["precision"]

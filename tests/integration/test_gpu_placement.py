"""Fractional GPU placement, proven on a CPU-only machine: a Ray node declaring one GPU fits
four SenseVoice replicas at 0.25 GPU each; a fifth stays pending. (The builder gives GPU
fractions only where the cluster has GPUs; every other test here runs on a GPU-less cluster.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from speech_serve.app import free_port

pytestmark = pytest.mark.integration
PROBE = Path(__file__).with_name("gpu_placement_probe.py")


def test_four_quarter_gpu_replicas_fit_on_one_gpu_and_a_fifth_waits(model_settings, tiny_models):
    placement = {name: {"num_cpus": 0, "num_gpus": 0} for name in ("Ingress", "VADHost", "Speaker")}
    placement["SenseVoice"] = {"num_cpus": 0, "num_gpus": 0.25, "num_replicas": 5}
    args = {"models": model_settings.model_dump(), "asr": {"threads": 1}, "speaker": {"threads": 1},
            "placement": placement}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(PROBE), json.dumps(args), str(free_port())],
        capture_output=True, text=True, timeout=400, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"probe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1].removeprefix("RESULT "))
    sense_voice = result["replicas"]["SenseVoice"]
    assert sense_voice.get("RUNNING") == 4, sense_voice
    assert sum(sense_voice.values()) == 5  # the fifth exists but cannot be placed
    assert result["gpu_available"] == pytest.approx(0.0)
    assert result["replicas"]["Speaker"].get("RUNNING") == 1  # no GPU asked: runs beside them

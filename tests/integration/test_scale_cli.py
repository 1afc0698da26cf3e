"""The scale CLI against a real cluster with a dashboard: a head node of its own (`ray start
--head --block`, stopped by ending that process, so the shared test cluster is untouched),
the app deployed from YAML with `serve deploy` as an operator would, then
`python -m serve_app.scale SenseVoice --min 2 --batch-size 16` changes it live."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serve_app.app import free_port
from serve_app.dashboard import APPLICATIONS, auth_headers

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def _yaml(model_settings, http_port: int) -> dict:
    config = yaml.safe_load((ROOT / "config" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    args = config["applications"][0]["args"]
    args["models"] = model_settings.model_dump()
    args["asr"]["threads"] = args["speaker"]["threads"] = 1
    args["placement"] = {name: {"num_cpus": 0} for name in ("Ingress", "VADHost", "SenseVoice", "Speaker")}
    return config


def _sense_voice(dashboard: str) -> dict:
    r = httpx.get(dashboard + APPLICATIONS, headers=auth_headers(), timeout=10)
    return r.json()["applications"]["speech"]["deployments"]["SenseVoice"]


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # the head node is still coming up
            last = exc
        time.sleep(1)
    raise AssertionError(f"{what} not reached in {timeout_s} s (last: {last})")


def test_scale_cli_changes_min_replicas_and_batch_size_live(model_settings, tiny_models, tmp_path):
    dash_port, http_port, gcs_port = free_port(), free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dash_port}"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(_yaml(model_settings, http_port)))
    # Token auth, as `serve run` has by default: the node and every client use ~/.ray/auth_token.
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2", "--include-dashboard=true",
         f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait(lambda: httpx.get(dashboard + APPLICATIONS, headers=auth_headers(), timeout=5).status_code == 200,
              120, "dashboard up")  # fmt: skip
        deploy = subprocess.run([BIN / "serve", "deploy", str(config), "--address", dashboard], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
        _wait(lambda: [r["state"] for r in _sense_voice(dashboard)["replicas"]] == ["RUNNING"], 180, "1 SenseVoice")
        before = {r["replica_id"] for r in _sense_voice(dashboard)["replicas"]}

        cli = subprocess.run(
            [sys.executable, "-m", "serve_app.scale", "SenseVoice", "--min", "2", "--max", "6", "--batch-size", "16",
             "--address", dashboard],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr
        assert "applied to speech/SenseVoice" in cli.stdout

        deployed = _wait(
            lambda: (d := _sense_voice(dashboard))
            and sum(r["state"] == "RUNNING" for r in d["replicas"]) == 2
            and d,
            120,
            "2 SenseVoice replicas",
        )  # fmt: skip
        config_now = deployed["deployment_config"]
        assert (config_now["autoscaling_config"]["min_replicas"], config_now["autoscaling_config"]["max_replicas"]) == (
            2,
            6,
        )
        assert config_now["user_config"]["max_batch_size"] == 16
        assert before <= {r["replica_id"] for r in deployed["replicas"]}  # the old replica kept running: no restart

        shown = subprocess.run([sys.executable, "-m", "serve_app.scale", "--show", "--address", dashboard],
                               capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)  # fmt: skip
        sv = next(d for d in json.loads(shown.stdout)["applications"][0]["deployments"] if d["name"] == "SenseVoice")
        assert sv["user_config"]["max_batch_size"] == 16 and sv["autoscaling_config"]["min_replicas"] == 2
    finally:  # this node's processes only: its own process group
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)

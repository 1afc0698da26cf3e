"""Scaling on a real cluster with a dashboard and a metrics endpoint: a head node of its own
(`ray start --head --block`, stopped by ending that process group, so the shared test cluster
is untouched), the app deployed from config/serve.yaml with `serve deploy` as an operator
would, with small numbers so replicas move within seconds:

  * the scale CLI changes SenseVoice's min replicas and batch size live;
  * VADHost and Ingress replicas follow live sessions up and back down, nobody loses a result;
  * an Ingress replica that Serve stops asks its sessions to reconnect (close 1012) only near
    its deadline, after sending every result; the clients reconnect and lose nothing;
  * every series the Grafana dashboard queries is exported.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from speech_serve.app import free_port
from speech_serve.cli.dashboard import APPLICATIONS, auth_headers
from tests.support.dashboard import dashboard_series
from tests.support.looping import LoopingDevice, finish_devices, wait_for
from tests.support.service import all_running, cluster_transport_env, stop_haproxy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
INGRESS_GRACE_S, DRAIN_MARGIN_S = 30, 20  # a stopping Ingress asks sessions to move 10 s after the stop


def _yaml(model_settings, http_port: int) -> dict:
    config = yaml.safe_load((ROOT / "config" / "serve.yaml").read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    app = config["applications"][0]
    args = app["args"]
    args["models"] = model_settings.model_dump()
    args["asr"], args["speaker"] = {"threads": 1}, {"threads": 1}
    args["placement"] = {name: {"num_cpus": 0} for name in ("Ingress", "VADHost", "SenseVoice", "Speaker")}
    args["drain"] = {"poll_s": 1.0, "margin_s": DRAIN_MARGIN_S, "idle_wait_s": 5.0}
    args["vad"] |= {"sessions_per_replica": 2}  # the Ingress's lanes and VADHost's policy alike
    # a refused second connection feeds the metric; no queue-delay refusals: a busy CI machine's speed
    # must not decide which sessions these tests get. A zero shed delay sheds the speaker model of
    # every utterance (nothing here reads speakers): the shed counter is exported, end to end.
    args["admission"] = {"max_connections_per_device": 1, "max_queue_delay_s": None, "shed_speaker_delay_s": 0.0}
    fast = {"min_replicas": 1, "max_replicas": 2, "upscale_delay_s": 2, "downscale_delay_s": 8,
            "metrics_interval_s": 1, "look_back_period_s": 3}  # fmt: skip
    # SenseVoice pinned from one replica up, as an operator's entry pins it over the builder's host plan
    app["deployments"].append({"name": "SenseVoice", "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}})
    deployments = {d["name"]: d for d in app["deployments"]}
    deployments["Ingress"]["autoscaling_config"] |= fast | {"target_ongoing_requests": 2}
    deployments["Ingress"]["graceful_shutdown_timeout_s"] = INGRESS_GRACE_S
    deployments["VADHost"]["autoscaling_config"] |= fast
    return config


@dataclass
class Cluster:
    dashboard: str
    ws: str
    metrics: str
    env: dict


@pytest.fixture(scope="module")
def cluster(model_settings, tiny_models, tmp_path_factory):
    dash_port, http_port, gcs_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    dashboard = f"http://127.0.0.1:{dash_port}"
    config = tmp_path_factory.mktemp("scaling") / "serve.yaml"
    config.write_text(yaml.safe_dump(_yaml(model_settings, http_port)))
    # Token auth, as `serve run` has by default: the node and every client use ~/.ray/auth_token.
    # The transport `make serve` picks (HAProxy where its binary is), with this cluster's own files.
    temp_dir = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's unix socket paths must fit in 107 bytes
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token",
           **cluster_transport_env(Path(temp_dir) / "hp")}  # fmt: skip
    head = subprocess.Popen(
        [BIN / "ray", "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=2", "--include-dashboard=true",
         f"--dashboard-port={dash_port}", f"--metrics-export-port={metrics_port}", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: httpx.get(dashboard + APPLICATIONS, headers=auth_headers(), timeout=5).status_code == 200,
              120, "dashboard up")  # fmt: skip
        deploy = subprocess.run([BIN / "serve", "deploy", str(config), "--address", dashboard], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
        healthz = f"http://127.0.0.1:{http_port}/healthz"
        wait_for(lambda: all_running(healthz), 180, "healthy")
        yield Cluster(dashboard, f"ws://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics", env)
    finally:  # this node's processes only: its own process group
        os.killpg(head.pid, signal.SIGTERM)
        try:  # a short grace: the node's state is thrown away (it took 33 s of CI to stop politely)
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        stop_haproxy(env)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _deployment(cluster: Cluster, name: str) -> dict:
    r = httpx.get(cluster.dashboard + APPLICATIONS, headers=auth_headers(), timeout=10)
    return r.json()["applications"]["speech"]["deployments"][name]


def _running(cluster: Cluster, name: str) -> int:
    return sum(r["state"] == "RUNNING" for r in _deployment(cluster, name)["replicas"])


def _scale(cluster: Cluster, *args: str) -> str:
    cli = subprocess.run([sys.executable, "-m", "speech_serve.cli.scale", *args, "--address", cluster.dashboard],
                         capture_output=True, text=True, env=cluster.env, cwd=ROOT, timeout=60)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    return cli.stdout


def test_scale_cli_changes_min_replicas_and_batch_size_live(cluster):
    wait_for(lambda: _running(cluster, "SenseVoice") == 1, 60, "1 SenseVoice")
    before = {r["replica_id"] for r in _deployment(cluster, "SenseVoice")["replicas"]}
    out = _scale(cluster, "SenseVoice", "--min", "2", "--max", "6", "--batch-size", "16")
    assert "applied to speech/SenseVoice" in out
    deployed = wait_for(lambda: _running(cluster, "SenseVoice") == 2 and _deployment(cluster, "SenseVoice"), 120,
                     "2 SenseVoice replicas")  # fmt: skip
    config_now = deployed["deployment_config"]
    scaling = config_now["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (2, 6)
    assert config_now["user_config"]["max_batch_size"] == 16
    assert before <= {r["replica_id"] for r in deployed["replicas"]}  # the old replica kept running: no restart

    shown = json.loads(_scale(cluster, "--show"))
    sv = next(d for d in shown["applications"][0]["deployments"] if d["name"] == "SenseVoice")
    assert sv["user_config"]["max_batch_size"] == 16 and sv["autoscaling_config"]["min_replicas"] == 2
    _scale(cluster, "SenseVoice", "--min", "1", "--max", "2")  # give the cores back to the tests below


def test_vad_and_ingress_replicas_follow_live_sessions_up_and_down(cluster):
    timeline: list[tuple[float, int, int, int]] = []
    devices: list[LoopingDevice] = []
    t0 = time.monotonic()

    def sample() -> tuple[int, int]:
        now = (_running(cluster, "Ingress"), _running(cluster, "VADHost"))
        timeline.append((round(time.monotonic() - t0), sum(d.is_alive() for d in devices), *now))
        return now

    try:
        for _ in range(4):  # 2 sessions per replica wanted by both deployments: 4 sessions -> 2 and 2
            devices.append(LoopingDevice(cluster.ws))
            devices[-1].start()
            for _ in range(4):
                sample()
                time.sleep(1)
        wait_for(lambda: sample() == (2, 2), 150, "2 Ingress and 2 VADHost replicas")
        # New sessions land on the new VADHost replica (the router prefers the least loaded).
        devices += [LoopingDevice(cluster.ws) for _ in range(2)]
        for d in devices[-2:]:
            d.start()
        # every session counted, on both replicas (each replica's count reaches the metrics on its own)
        wait_for(lambda: len(s := _vad_sessions_by_replica(cluster)) == 2 and all(s.values())
                 and sum(s.values()) == len(devices), 60, "all sessions counted, on both VADHost replicas")  # fmt: skip
        sample()
        finish_devices(devices)
        wait_for(lambda: sample() == (1, 1), 150, "back to 1 Ingress and 1 VADHost replica")
    finally:
        for d in devices:
            d.stop.set()
        print("\nt_s sessions ingress vadhost")
        for row in timeline:
            print(*row)
    assert max(r[2] for r in timeline) == 2 and max(r[3] for r in timeline) == 2
    assert all(d.moved == 0 for d in devices)  # scaling down after the sessions ended cut nobody


def test_stopping_ingress_asks_its_sessions_to_reconnect_and_nothing_is_lost(cluster):
    _scale(cluster, "Ingress", "--min", "2", "--max", "2")
    wait_for(lambda: _running(cluster, "Ingress") == 2, 120, "2 Ingress replicas")
    devices = [LoopingDevice(cluster.ws) for _ in range(4)]
    try:
        for d in devices:
            d.start()
            time.sleep(1)
        time.sleep(5)
        stopped_at = time.monotonic()
        _scale(cluster, "Ingress", "--min", "1", "--max", "1")  # Serve stops one of the two
        wait_for(lambda: sum(d.moved for d in devices) > 0, INGRESS_GRACE_S + 30, "a session asked to reconnect")
        waited = time.monotonic() - stopped_at
        time.sleep(5)  # the moved clients carry on on the surviving replica
        finish_devices(devices)
    finally:
        for d in devices:
            d.stop.set()
    moved = [d for d in devices if d.moved]
    # Only the stopping replica's sessions moved, and only near Serve's deadline, not at once.
    assert 0 < len(moved) < len(devices), [d.connections for d in devices]
    assert waited >= INGRESS_GRACE_S - DRAIN_MARGIN_S - 1
    for d in moved:
        old = d.connections[0]
        assert old["errors"] and old["errors"][-1]["code"] == "reconnect"
        assert len(d.connections) == 2  # one reconnect, then served to the end
    _scale(cluster, "Ingress", "--min", "1", "--max", "2")


def _series(cluster: Cluster, name: str) -> list[tuple[str, float]]:
    """(labels, value) of each sample of one series on the node's metrics endpoint."""
    text = httpx.get(cluster.metrics, timeout=10).text
    return [(line[len(name) : line.rindex("}") + 1], float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines() if line.startswith(name + "{")]  # fmt: skip


def _vad_sessions_by_replica(cluster: Cluster) -> dict[str, float]:
    return {labels: value for labels, value in _series(cluster, "ray_speech_vad_sessions")}


def test_every_series_the_grafana_dashboard_queries_is_exported(cluster):
    device = {"Device-Id": "02:00:00:00:00:01", "Client-Id": "c1", "Protocol-Version": "1"}
    with connect(cluster.ws + "/xiaozhi/v1/", additional_headers=device, open_timeout=30) as first:
        # The hello answer proves the first connection holds the device's slot: two connections
        # opened back to back on a slow machine may be admitted in either order.
        first.send(json.dumps({"type": "hello", "version": 1, "transport": "websocket",
                               "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1,
                                                "frame_duration": 60}}))  # fmt: skip
        assert json.loads(first.recv(timeout=60))["type"] == "hello"
        with pytest.raises(ConnectionClosed) as refused:  # a second connection of one device: refused, counted
            with connect(cluster.ws + "/xiaozhi/v1/", additional_headers=device, open_timeout=30) as ws:
                while True:
                    ws.recv(timeout=60)
    assert refused.value.rcvd.code == 1008
    # The drain test above produced reconnects; Ray's agent exports about every 10 s.
    wanted = dashboard_series()
    deadline, missing = time.monotonic() + 90, wanted
    while missing and time.monotonic() < deadline:
        time.sleep(2)
        missing = {s for s in wanted if not _series(cluster, s)}
    assert not missing, f"not exported after 90 s: {missing}"
    text = httpx.get(cluster.metrics, timeout=10).text
    answered = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ray_speech_utterances_total{") and 'outcome="ok"' in line
    ]
    assert sum(answered) > 0

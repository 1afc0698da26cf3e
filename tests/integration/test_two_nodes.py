"""Two Ray nodes on one machine, as an operator runs them (docs/operations.md): a head
node (`ray start --head`, dashboard on) and a worker node joined to it (`ray start --address`,
with the custom resource `speech_worker`), each with its own temp dir and ports, each stopped by
ending its own process group (the shared test cluster and anyone else's Ray are untouched). The
app is deployed with `serve deploy` from config/multi-node.yaml (VADHost and the models on
`speech_worker` nodes) with small numbers; here the Ingress is also kept on the head and the
session registry on the worker, so that losing the worker takes the registry with it.

  * VADHost, SenseVoice, Speaker and the registry run on the worker; a proxy runs on each node,
    each on its own HTTP port (Ray's RAY_SERVE_WORKER_PROXY_HTTP_PORT, set in the worker node's
    environment: two proxies on one IP cannot share a port); devices through either get results;
  * the overall cap and a device's connection limit hold for sessions arriving through both;
  * the worker node is stopped while devices stream (SIGTERM to its processes, what `ray stop`
    does on that machine; NODE_LOSS_KILL=hard: SIGKILL) and a replacement joins, as an autoscaler
    or KubeRay would start one: sessions whose Ingress survived lose no utterance; those whose
    proxy was on the lost node are cut and reconnect through the head; the registry, restarted
    empty, is rebuilt from the Ingress's syncs (a device's connection limit holds again).

The long version (docs/operations.md): `make node-loss` (20 devices through the head, the worker SIGKILLed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from speech_serve.app import free_port
from speech_serve.cli.dashboard import APPLICATIONS, auth_headers
from speech_serve.cli.profile import load
from speech_serve.wire.client import stream_file
from speech_serve.wire.tokens import device_headers
from tests.support.audio import TWO_UTTERANCES_WAV
from tests.support.looping import UTTERANCES_PER_LOOP, LoopingDevice, finish_devices, wait_for
from tests.support.service import all_running

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
DEVICES = int(os.environ.get("NODE_LOSS_DEVICES", "3"))  # streaming through the head's proxy
THROUGH_WORKER = max(1, DEVICES // 4)  # streaming through the worker's proxy (cut with it)
HARD_KILL = os.environ.get("NODE_LOSS_KILL", "stop") == "hard"
PER_DEVICE = 2  # admission.max_connections_per_device
# admission.max_sessions_total: room for every session of the node-loss test and one more device
SESSIONS_CAP = DEVICES + THROUGH_WORKER + PER_DEVICE + 2
ON_WORKER = ("VADHost", "SenseVoice", "Speaker", "SessionRegistry")


def _config(model_settings, http_port: int) -> dict:
    config = load(ROOT / "config" / "multi-node.yaml")
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    app = config["applications"][0]
    args = app["args"]
    args["models"] = model_settings.model_dump()
    args["asr"], args["speaker"] = {"threads": 1}, {"threads": 1}
    # a 2-core machine: no reservations, as the other integration tests
    args["placement"] = {name: {**args["placement"].get(name, {}), "num_cpus": 0}
                         for name in ("Ingress", "VADHost", "SenseVoice", "Speaker")}  # fmt: skip
    args["placement"]["Ingress"]["resources"] = {"speech_ingress": 0.001}  # test layout: see the docstring
    args["stream"], args["limits"] = {"vad_batch_interval_ms": 20}, {"max_audio_rate": None}  # as conftest.py
    args["admission"] = {"max_connections_per_device": PER_DEVICE, "max_sessions_total": SESSIONS_CAP,
                         "max_queue_delay_s": None, "sync_s": 1.0}  # fmt: skip
    for d in app["deployments"]:
        d.pop("autoscaling_config", None)
        d["num_replicas"] = 1
    # The registry is placed by its deployments entry (ray_actor_options written whole), as deploy/kuberay does.
    on_worker = {"num_cpus": 0, "resources": {"speech_worker": 0.001}}
    app["deployments"].append({"name": "SessionRegistry", "ray_actor_options": on_worker})
    return config


@dataclass
class Node:
    """One `ray start --block` in its own process group: stopping it touches nothing else."""

    name: str
    proc: subprocess.Popen
    temp_dir: str
    http_port: int

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 45) -> None:
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=grace_s)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:  # whatever ignored the signal (`ray stop` does the same after its grace period)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class TwoNodes:
    dashboard: str
    head: Node
    worker: Node
    gcs_port: int
    env: dict
    config: Path
    nodes: list[Node] = field(default_factory=list)  # every node started, for the teardown

    def ws(self, node: Node) -> str:
        return f"ws://127.0.0.1:{node.http_port}"

    def start_worker(self, name: str) -> Node:
        """A worker node joined to the head, its Serve proxy on a port of its own."""
        port = free_port()
        node = _start_node(name, self.env | {"RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(port)},
                           [f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=1",
                            '--resources={"speech_worker": 1000}'], port)  # fmt: skip
        self.nodes.append(node)
        return node

    def get(self, path: str) -> dict:
        return httpx.get(self.dashboard + path, headers=auth_headers(), timeout=10).json()

    def node_ids(self) -> dict[str, str]:
        """Alive node id -> "head" or "worker"."""
        rows = self.get("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return {r["node_id"]: "head" if r["is_head_node"] else "worker" for r in rows if r["state"] == "ALIVE"}

    def replicas(self) -> dict[str, list[tuple[str, str]]]:
        """Deployment -> [(state, node id)] of its replicas."""
        deployments = self.get(APPLICATIONS)["applications"]["speech"]["deployments"]
        return {name: [(r["state"], r["node_id"]) for r in d["replicas"]] for name, d in deployments.items()}

    def proxies(self) -> dict[str, str]:
        """Node id -> its proxy's status."""
        return {node_id: p["status"] for node_id, p in self.get(APPLICATIONS)["proxies"].items()}


def _start_node(name: str, env: dict, args: list[str], http_port: int) -> Node:
    temp_dir = tempfile.mkdtemp(prefix=f"r{name[0]}", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    proc = subprocess.Popen(
        [BIN / "ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
         f"--dashboard-agent-listen-port={free_port()}", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT, start_new_session=True,
    )  # fmt: skip
    return Node(name, proc, temp_dir, http_port)


@pytest.fixture(scope="module")
def two_nodes(model_settings, tiny_models, tmp_path_factory):
    gcs_port, dash_port, http_port = free_port(), free_port(), free_port()
    config = tmp_path_factory.mktemp("two-nodes") / "serve.yaml"
    config.write_text(yaml.safe_dump(_config(model_settings, http_port)))
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "token"}
    head = _start_node("head", env, ["--head", f"--port={gcs_port}", "--num-cpus=1", "--include-dashboard=true",
                                     f"--dashboard-port={dash_port}", f"--ray-client-server-port={free_port()}",
                                     '--resources={"speech_ingress": 1000}'], http_port)  # fmt: skip
    cluster = TwoNodes(f"http://127.0.0.1:{dash_port}", head, None, gcs_port, env, config, [head])
    try:
        wait_for(lambda: httpx.get(cluster.dashboard + APPLICATIONS, headers=auth_headers(), timeout=5).status_code
              == 200, 120, "dashboard up")  # fmt: skip
        cluster.worker = cluster.start_worker("worker")
        wait_for(lambda: len(cluster.node_ids()) == 2, 120, "the worker joined")
        _deploy(cluster)
        for node in (cluster.head, cluster.worker):
            wait_for(lambda n=node: all_running(f"http://127.0.0.1:{n.http_port}/healthz"),
                  240, f"healthy through the {node.name}'s proxy")  # fmt: skip
        yield cluster
    finally:  # the workers first, then the head; each its own process group, a short grace: nothing to save
        for node in reversed(cluster.nodes):
            node.stop(grace_s=5)
        for node in cluster.nodes:
            shutil.rmtree(node.temp_dir, ignore_errors=True)


def _deploy(cluster: TwoNodes) -> None:
    deploy = subprocess.run([BIN / "serve", "deploy", str(cluster.config), "--address", cluster.dashboard],
                            env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]


def _on(cluster: TwoNodes, role: str) -> str:
    (node_id,) = [n for n, r in cluster.node_ids().items() if r == role]
    return node_id


def _open(url: str, device: str) -> tuple:
    ws = connect(url + "/v1/stream", additional_headers=device_headers(device, None), open_timeout=30)
    return ws, json.loads(ws.recv(timeout=60))


def _refusal(ws) -> tuple[dict | None, int | None]:
    """The error frame and close code of a refused connection."""
    frame = None
    try:
        while True:
            frame = json.loads(ws.recv(timeout=60))
    except ConnectionClosed as closed:
        return frame, closed.rcvd.code if closed.rcvd else None


def test_vad_and_models_on_the_worker_a_proxy_on_each_node_and_devices_through_both_get_results(two_nodes):
    head, worker = _on(two_nodes, "head"), _on(two_nodes, "worker")
    replicas = two_nodes.replicas()
    for name in ON_WORKER:
        assert replicas[name] == [("RUNNING", worker)], (name, replicas[name])
    assert replicas["Ingress"] == [("RUNNING", head)]
    assert two_nodes.proxies() == {head: "HEALTHY", worker: "HEALTHY"}
    results: dict[str, list] = {}

    def stream(node: Node) -> None:
        results[node.name] = stream_file(two_nodes.ws(node) + "/v1/stream", str(TWO_UTTERANCES_WAV), frame_ms=100)

    threads = [threading.Thread(target=stream, args=(n,)) for n in (two_nodes.head, two_nodes.worker)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for name in ("head", "worker"):
        assert [r["index"] for r in results[name] if r["type"] == "result"] == [0, 1], results.get(name)


def test_the_overall_cap_and_a_devices_limit_hold_across_both_nodes(two_nodes):
    urls = [two_nodes.ws(two_nodes.head), two_nodes.ws(two_nodes.worker)]
    opened = []
    try:
        # One device, its connections through both nodes: the third is refused through either.
        for url in urls:
            ws, first = _open(url, "02:00:00:00:20:01")
            opened.append(ws)
            assert first["type"] == "ready", first
        for url in urls:
            ws, first = _open(url, "02:00:00:00:20:01")
            opened.append(ws)
            assert first["code"] == "too_many_connections", first
            assert _refusal(ws)[1] == 1008
        # Other devices fill the overall cap alternating between the nodes; the next is refused.
        for n in range(SESSIONS_CAP - PER_DEVICE):
            ws, first = _open(urls[n % 2], f"02:00:00:00:21:{n:02x}")
            opened.append(ws)
            assert first["type"] == "ready", first
        for url in urls:
            ws, first = _open(url, "02:00:00:00:22:01")
            opened.append(ws)
            assert first["code"] == "server_busy" and f"maximum of {SESSIONS_CAP}" in first["message"], first
            assert _refusal(ws)[1] == 1013
    finally:
        for ws in opened:
            ws.close()


class CutDevice(threading.Thread):
    """A device streaming the test WAV in a loop through the worker's proxy, until that connection
    is cut with the node; then it reconnects through the head and streams the file once more."""

    def __init__(self, url: str, fallback: str):
        super().__init__(daemon=True)
        with wave.open(str(TWO_UTTERANCES_WAV), "rb") as w:
            self.pcm = w.readframes(w.getnframes())
        self.url, self.fallback = url, fallback
        self.results: list[int] = []
        self.close: int | None = -1  # -1: not closed yet; None: closed without a close frame
        self.after_reconnect: list[dict] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.url + "/v1/stream", open_timeout=30) as ws:
                assert json.loads(ws.recv(timeout=60))["type"] == "ready"
                ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
                json.loads(ws.recv(timeout=60))
                reader = threading.Thread(target=self._read, args=(ws,), daemon=True)
                reader.start()
                pos, step = 0, 3200  # 100 ms frames at real-time pace
                while self.close == -1:
                    try:
                        ws.send(self.pcm[pos % len(self.pcm) : pos % len(self.pcm) + step])
                    except ConnectionClosed:
                        break
                    pos += step
                    time.sleep(0.1)
                reader.join(30)
            self.after_reconnect = stream_file(self.fallback + "/v1/stream", str(TWO_UTTERANCES_WAV), frame_ms=100)
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def _read(self, ws) -> None:
        try:
            while True:
                msg = json.loads(ws.recv(timeout=300))
                if msg["type"] == "result":
                    self.results.append(msg["index"])
        except ConnectionClosed as exc:
            self.close = exc.rcvd.code if exc.rcvd else None
        except TimeoutError:
            self.close = 0


def test_losing_the_worker_node_loses_no_utterance_of_sessions_whose_ingress_survived(two_nodes):
    head, lost = two_nodes.head, two_nodes.worker
    lost_id = _on(two_nodes, "worker")
    # A device with its connection limit reached through the head: after the registry is rebuilt
    # on the replacement node, a third connection must be refused again.
    quiet = [_open(two_nodes.ws(head), "02:00:00:00:30:01") for _ in range(PER_DEVICE)]
    assert all(first["type"] == "ready" for _, first in quiet), quiet
    devices = [LoopingDevice(two_nodes.ws(head)) for _ in range(DEVICES)]
    cut = [CutDevice(two_nodes.ws(lost), two_nodes.ws(head)) for _ in range(THROUGH_WORKER)]
    try:
        for d in [*devices, *cut]:
            d.start()
            time.sleep(0.5)
        wait_for(lambda: all(d.results >= UTTERANCES_PER_LOOP for d in devices), 120, "every device answered")
        stopped = time.monotonic()
        lost.stop(signal.SIGKILL if HARD_KILL else signal.SIGTERM)
        two_nodes.worker = two_nodes.start_worker("replacement")
        wait_for(lambda: lost_id not in two_nodes.node_ids(), 120, "the lost node declared dead")
        dead_after_s = time.monotonic() - stopped
        new_worker = wait_for(lambda: _on(two_nodes, "worker"), 120, "the replacement joined")
        wait_for(lambda: all(two_nodes.replicas()[n] == [("RUNNING", new_worker)] for n in ON_WORKER), 300,
              "replicas running on the replacement")  # fmt: skip
        replaced_after_s = time.monotonic() - stopped
        answered_at = {id(d): d.results for d in devices}
        wait_for(lambda: all(d.results >= answered_at[id(d)] + UTTERANCES_PER_LOOP for d in devices), 240,
              "every device answered after the replacement")  # fmt: skip
        refused = wait_for(lambda: _third_connection_refused(two_nodes.ws(head)), 60,
                        "the device's third connection refused by the rebuilt registry")  # fmt: skip
        finish_devices(devices)  # every utterance answered exactly once, in order (a loop's worth each)
        for d in cut:
            d.join(240)
    finally:
        for d in devices:
            d.stop.set()
        for ws, _ in quiet:
            ws.close()
    # The sessions whose proxy was lost ended on the Ingress too: nothing holds a slot.
    healthz = f"http://127.0.0.1:{head.http_port}/healthz"
    wait_for(lambda: httpx.get(healthz, timeout=10).json()["live_sessions_this_replica"] == 0, 120,
          "no session left on the Ingress")  # fmt: skip
    assert refused == ("too_many_connections", 1008)
    for d in cut:
        assert d.failure is None, d.failure
        assert d.close in (None, 1001, 1006, 1011, 1012), d.close  # cut with the node's proxy (no 1000)
        assert [r["index"] for r in d.after_reconnect if r["type"] == "result"] == [0, 1]
    results = sum(d.results for d in devices)
    print(f"\n{DEVICES} devices through the head, {THROUGH_WORKER} through the worker "
          f"({'SIGKILL' if HARD_KILL else 'SIGTERM'}): node declared dead {dead_after_s:.0f} s and replicas "
          f"running on the replacement {replaced_after_s:.0f} s after the stop; {results} utterances answered, "
          f"0 lost; cut connections closed with {[d.close for d in cut]}")  # fmt: skip


def _third_connection_refused(url: str) -> tuple[str, int] | None:
    ws, first = _open(url, "02:00:00:00:30:01")
    if first["type"] == "ready":  # the registry has not heard from the Ingress yet: not a refusal
        ws.close()
        return None
    frame, code = _refusal(ws)
    return first.get("code"), code

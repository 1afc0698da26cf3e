"""The integration tests' real service: its credentials and caps, and how a test looks at what it
holds (tests/integration/conftest.py starts it)."""

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import ray
from ray import serve

from speech_serve.app import build_app
from speech_serve.wire.tokens import issue_token
from tests.support.audio import TWO_UTTERANCES_SPEECH_MS

APP = "speech"
SECRET_ENV, SECRET = "SPEECH_SERVE_TEST_SECRET", "test-secret-not-for-production"
ADMIN_ENV, ADMIN_TOKEN = "SPEECH_SERVE_TEST_ADMIN_TOKEN", "test-admin-token-not-for-production"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# The URL of the cluster's PostgreSQL voiceprint database (the test server's: tests/support/postgres.py),
# in every Ray worker's environment, for apps whose store is `env:` + this (test_shared_store_e2e.py)
STORE_ENV = "SPEECH_SERVE_TEST_VOICEPRINT_STORE"
ALLOWED_DEVICE = "02:00:00:00:00:aa"
TEST_DEVICE = "02:00:00:00:00:01"  # what the plain and FunASR clients here call themselves
TEST_GROUP = "home-e2e"  # TEST_DEVICE's speaker group (security.device_groups): its household
SESSIONS_CAP = 24  # small enough to reach in a test; above what the other tests hold at once
DEVICE_CONNECTIONS_CAP = 8  # above the concurrent sessions tests open as TEST_DEVICE


def device_token(device_id: str = TEST_DEVICE, client_id: str = "") -> str:
    return issue_token(SECRET, client_id, device_id)


def as_device(device_id: str = TEST_DEVICE) -> dict:
    """Keyword arguments for speech_serve.wire.client.stream_file and run_funasr."""
    return {"device_id": device_id, "token": device_token(device_id)}


def admission_state(base: str) -> dict[str, int]:
    """What still holds a slot or state: the registry's sessions, the Ingress's live sessions
    and stream tasks, the VADHosts' sessions, and model work queued for anyone (a client that
    left must leave none)."""
    health = httpx.get(f"http://{base}/healthz", headers=ADMIN, timeout=30).json()  # the details need it
    registry = serve.get_deployment_handle("SessionRegistry", app_name=APP)
    return {
        "registry_sessions": registry.live.remote().result(timeout_s=30),
        "ingress_sessions": health["live_sessions_this_replica"],
        "ingress_stream_tasks": health["stream_tasks_this_replica"],
        "vad_sessions": vad_live_sessions(),
        "asr_queued": serve.get_deployment_handle("SenseVoice", app_name=APP).queued.remote().result(timeout_s=30),
        "speaker_queued": serve.get_deployment_handle("Speaker", app_name=APP).queued.remote().result(timeout_s=30),
    }


def wait_admission_clean(base: str, timeout_s: float = 90) -> dict[str, int]:
    """Wait until no session holds anything; the timeout is a hang guard for slow machines."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = admission_state(base)
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.5)


def all_running(url: str) -> bool:
    """/healthz says every deployment runs: "ok" (200 also comes "degraded", with the Speaker still starting)."""
    r = httpx.get(url, timeout=5)
    return r.status_code == 200 and r.json()["status"] == "ok"


def wait_healthy(url: str, timeout_s: float = 120, request_timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.get(url, timeout=request_timeout_s)
        if r.status_code == 200 and r.json()["status"] == "ok":  # "degraded": the Speaker still starting
            return r.json()
        time.sleep(1)
    raise AssertionError(f"service not healthy in {timeout_s} s: {r.status_code} {r.text}")


@contextmanager
def app_beside(service: str, args: dict, name: str, prefix: str) -> Iterator[str]:
    """A test's own application beside the shared one: http://service/prefix once healthy. Deleted
    afterwards without waiting: its replicas stop in the background, and no test waits on them."""
    serve.run(build_app(args), name=name, route_prefix=prefix)
    base = f"http://{service}{prefix}"
    wait_healthy(f"{base}/healthz", timeout_s=300, request_timeout_s=30)
    try:
        yield base
    finally:
        serve.delete(name, _blocking=False)


def vad_replicas():
    names = ray.util.list_named_actors(all_namespaces=True)
    return [
        ray.get_actor(n["name"], namespace=n["namespace"])
        for n in names
        if n["name"].startswith("SERVE_REPLICA::") and f"{APP}#VADHost#" in n["name"]
    ]


def vad_live_sessions() -> int:
    return sum(_live_sessions(a) for a in vad_replicas())


def _live_sessions(replica) -> int:
    try:
        return ray.get(replica.record_routing_stats.remote()).get("live_sessions", 0)
    except ray.exceptions.RayTaskError as exc:
        # A replacement replica still starting (after test_serve_e2e kills one) holds no session yet.
        if "must be called before" in str(exc) or "_user_record_routing_stats" in str(exc):
            return 0
        raise


def xiaozhi_url(service: str) -> str:
    return f"ws://{service}/xiaozhi/v1/"


def assert_two_utterances_in_order(results: list[dict], tolerance_ms: int = 400) -> None:
    assert [r["index"] for r in results] == [0, 1]
    for r, (start, end) in zip(results, TWO_UTTERANCES_SPEECH_MS, strict=True):
        assert abs(r["start_ms"] - start) < tolerance_ms and abs(r["end_ms"] - end) < tolerance_ms
        assert r["text"]


# Which transport the test clusters use: HAProxy mode where its binary is, as `make serve` chooses
# (speech_serve/cli/transport.py); SPEECH_SERVE_TEST_TRANSPORT=proxy runs them on Serve's Python
# proxy instead (`make test` runs the end-to-end protocol tests both ways).
TRANSPORT_ENV = "SPEECH_SERVE_TEST_TRANSPORT"


def cluster_transport_env(state_dir: Path) -> dict[str, str]:
    """The env a test Ray cluster starts with for the chosen transport. HAProxy keeps its files and
    stats and metrics ports per cluster here, so the shared cluster and a test's own do not collide."""
    from speech_serve.app import free_port
    from speech_serve.cli.transport import transport_env

    chosen = os.environ.get(TRANSPORT_ENV, "auto")
    state_dir.mkdir(parents=True, exist_ok=True)
    env, _ = transport_env({"proxy": "off", "haproxy": "on"}.get(chosen, chosen), state=state_dir)
    if not env:
        return {}
    return env | {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


def haproxy_pids(env: dict[str, str]) -> list[int]:
    """The haproxy processes that run on this cluster's state directory (their own config file)."""
    state = env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")
    if not state:
        return []
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process has gone
            continue
        if args and args[0].endswith(b"haproxy") and any(state.encode() in a for a in args):
            pids.append(int(cmdline.parent.name))
    return pids


def haproxy_running(env: dict[str, str]) -> bool:
    return bool(haproxy_pids(env))


def stop_haproxy(env: dict[str, str]) -> None:
    """HAProxy runs in a session of its own: a cluster killed by its process group leaves it behind."""
    for pid in haproxy_pids(env):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

"""One real local Ray Serve for every integration test in the run (the app builder's
application, tiny models, sized for a 2-core machine: no CPU reservations, one replica each
but two VADHost replicas so a session can lose its VAD replica and be re-pinned).
Device authentication is on (though it binds 127.0.0.1), with a test secret and one
allow-listed device; the admin API has a test token. Clients here send tokens as devices do."""

import os
import time

import httpx
import pytest
import ray
from ray import serve

from speech_serve.app import free_port, run_local
from speech_serve.wire.tokens import issue_token

APP = "speech"
SECRET_ENV, SECRET = "SPEECH_SERVE_TEST_SECRET", "test-secret-not-for-production"
ADMIN_ENV, ADMIN_TOKEN = "SPEECH_SERVE_TEST_ADMIN_TOKEN", "test-admin-token-not-for-production"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
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


@pytest.fixture(scope="session")
def service_args(model_settings, tiny_models, tmp_path_factory) -> dict:
    """The builder args of the test service. The speaker model is resemblyzer's GE2E (real
    weights) so that who-spoke can be tested; ERes2NetV2's path is covered by the unit tests."""
    placement = {name: {"num_cpus": 0} for name in ("Ingress", "VADHost", "SenseVoice", "Speaker")}
    placement["VADHost"]["num_replicas"] = 2
    return {
        "models": {**model_settings.model_dump(), "speaker_backend": "ge2e"},
        "asr": {"threads": 1},
        # Tests stream faster than real time; 100 ms between a lane's VAD calls (the production
        # default, for CPU per device) would hold them to 2x real time and add minutes to CI, and
        # max_audio_rate would pace them to 1.5x real time (unit-tested instead).
        "ingress": {"vad_batch_interval_ms": 20, "max_audio_rate": None},
        "speaker": {"threads": 1},
        "placement": placement,
        "security": {
            "device_auth": "on",
            "device_secret_env": SECRET_ENV,
            "allowed_devices": [ALLOWED_DEVICE],
            "device_groups": {TEST_DEVICE: TEST_GROUP},
            "admin_token_env": ADMIN_ENV,
        },
        "voiceprints": {"store": str(tmp_path_factory.mktemp("voiceprints") / "voiceprints.sqlite3")},
        "admission": {"max_sessions_total": SESSIONS_CAP, "max_connections_per_device": DEVICE_CONNECTIONS_CAP},
    }


@pytest.fixture(scope="session")
def service(service_args):
    """host:port of the running service."""
    os.environ[SECRET_ENV] = SECRET  # inherited by the Ray workers started below
    os.environ[ADMIN_ENV] = ADMIN_TOKEN
    base = run_local(service_args, free_port(), name=APP, num_cpus=2)
    wait_healthy(f"http://{base}/healthz")
    yield base
    serve.shutdown()
    ray.shutdown()


def admission_state(base: str) -> dict[str, int]:
    """What still holds a slot or state: the registry's sessions, the Ingress's live sessions
    and stream tasks, the VADHosts' sessions, and model work queued for anyone (a client that
    left must leave none)."""
    health = httpx.get(f"http://{base}/healthz", timeout=30).json()
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


@pytest.fixture(scope="module", autouse=True)
def clean_admission(request):
    """Every module that uses the shared service starts from, and leaves, a clean admission
    state: a slot held by a client that left would refuse the next module's sessions."""
    mine = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    uses_service = any("service" in item.fixturenames for item in mine)
    if not uses_service:
        yield
        return
    base = request.getfixturevalue("service")
    assert not any((state := wait_admission_clean(base)).values()), f"held before this module: {state}"
    yield
    assert not any((state := wait_admission_clean(base)).values()), f"left behind by this module: {state}"


def wait_healthy(url: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = httpx.get(url, timeout=10)
        if r.status_code == 200:
            return r.json()
        time.sleep(1)
    raise AssertionError(f"service not healthy in {timeout_s} s: {r.status_code} {r.text}")


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

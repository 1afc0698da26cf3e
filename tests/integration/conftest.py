"""One real local Ray Serve for every integration test in the run (the app builder's
application, tiny models, sized for a 2-core machine: no CPU reservations, one replica each
but two VADHost replicas so a session can lose its VAD replica and be re-pinned).
Device authentication is on, with a test secret and one allow-listed device."""

import os
import time

import httpx
import pytest
import ray
from ray import serve

from serve_app.app import free_port, run_local

APP = "speech"
SECRET_ENV, SECRET = "SPEECH_SERVE_TEST_SECRET", "test-secret-not-for-production"
ALLOWED_DEVICE = "02:00:00:00:00:aa"
SESSIONS_CAP = 24


@pytest.fixture(scope="session")
def service_args(model_settings, tiny_models, tmp_path_factory) -> dict:
    """The builder args of the test service. The speaker model is resemblyzer's GE2E (real
    weights) so that who-spoke can be tested; ERes2NetV2's path is covered by the unit tests."""
    placement = {name: {"num_cpus": 0} for name in ("Ingress", "VADHost", "SenseVoice", "Speaker")}
    placement["VADHost"]["num_replicas"] = 2
    return {
        "models": {**model_settings.model_dump(), "speaker_backend": "ge2e"},
        "asr": {"threads": 1},
        "speaker": {"threads": 1},
        "placement": placement,
        "xiaozhi": {"auth_enabled": True, "secret_env": SECRET_ENV, "allowed_devices": [ALLOWED_DEVICE]},
        "voiceprints": {"store": str(tmp_path_factory.mktemp("voiceprints") / "voiceprints.sqlite3")},
        # Small enough to reach in a test; the load test's 20 devices fit.
        "admission": {"max_sessions_total": SESSIONS_CAP, "max_connections_per_device": 2},
    }


@pytest.fixture(scope="session")
def service(service_args):
    """host:port of the running service."""
    os.environ[SECRET_ENV] = SECRET  # inherited by the Ray workers started below
    base = run_local(service_args, free_port(), name=APP, num_cpus=2)
    wait_healthy(f"http://{base}/healthz")
    yield base
    serve.shutdown()
    ray.shutdown()


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
    return sum(ray.get(a.record_routing_stats.remote()).get("live_sessions", 0) for a in vad_replicas())

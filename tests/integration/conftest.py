"""One real local Ray Serve for every integration test in the run (the app builder's
application, tiny models, sized for a 2-core machine: no CPU reservations, one replica each
but two VADHost replicas so a session can lose its VAD replica and be re-pinned).
Device authentication is on (though it binds 127.0.0.1), with a test secret and one
allow-listed device; the admin API has a test token. Clients here send tokens as devices do.
The shared app's voiceprints are a SQLite file; the Ray workers also get the URL of a database on the
test PostgreSQL server (STORE_ENV) for apps on the shared store (test_shared_store_e2e.py)."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import ray
from ray import serve

from speech_serve.app import free_port, run_local
from tests.support.service import (
    ADMIN_ENV,
    ADMIN_TOKEN,
    ALLOWED_DEVICE,
    APP,
    DEVICE_CONNECTIONS_CAP,
    SECRET,
    SECRET_ENV,
    SESSIONS_CAP,
    STORE_ENV,
    TEST_DEVICE,
    TEST_GROUP,
    cluster_transport_env,
    wait_admission_clean,
    wait_healthy,
)


@pytest.fixture(scope="session")
def service_args(model_settings, tiny_models, tmp_path_factory) -> dict:
    """The builder args of the test service. The speaker model is resemblyzer's GE2E (real
    weights) so that who-spoke can be tested; ERes2NetV2's path is covered by the unit tests."""
    placement = {name: {"num_cpus": 0} for name in ("Ingress", "VADHost", "SenseVoice", "Speaker")}
    placement["VADHost"]["num_replicas"] = 2
    return {
        "models": {**model_settings.model_dump(), "speaker_backend": "ge2e"},
        # fp32: the soak and churn tests compare every transcript with an undisturbed run's, and int8
        # (the CPU default) quantizes activations per batch, so its text can change with batch-mates
        "asr": {"threads": 1, "quantize": "none"},
        # Tests stream faster than real time; 100 ms between a lane's VAD calls (the production
        # default, for CPU per device) would hold them to 2x real time and add minutes to CI, and
        # max_audio_rate would pace them to 1.5x real time (unit-tested instead).
        "stream": {"vad_batch_interval_ms": 20},
        "limits": {"max_audio_rate": None},
        # the speaker's wait past the text: wide enough that a busy CI host never makes a healthy Speaker
        # late (the tests read who spoke), short enough that a killed one does not hold the text
        "speaker": {"threads": 1, "budget_ms": 2000},
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
def transport() -> dict[str, str]:
    """The shared service's transport env (HAProxy where its binary is, unless told otherwise)."""
    state = Path(tempfile.mkdtemp(prefix="hp", dir="/tmp"))  # short: HAProxy's socket path holds 97 bytes
    yield cluster_transport_env(state)
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def service(service_args, transport, postgres):
    """host:port of the running service."""
    os.environ[SECRET_ENV] = SECRET  # inherited by the Ray workers started below
    os.environ[ADMIN_ENV] = ADMIN_TOKEN
    os.environ[STORE_ENV] = postgres.create_database()  # for apps on the shared PostgreSQL store
    before = dict(os.environ)
    os.environ.update(transport)  # only while Ray starts: its processes keep it, later clusters do not
    try:
        base = run_local(service_args, free_port(), name=APP, num_cpus=2)
    finally:
        os.environ.clear()
        os.environ.update(before)
    wait_healthy(f"http://{base}/healthz")
    yield base
    serve.shutdown()
    ray.shutdown()


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

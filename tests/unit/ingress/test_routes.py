"""The Ingress's HTTP routes (routes.py) never block the event loop every session shares: /healthz
asks the controller off the loop, once for concurrent probes, bounded; admin routes reach SQLite
off the loop."""

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest
from ray import serve
from starlette.requests import Request

from speech_serve.ingress.auth import AdminAuth
from speech_serve.ingress.capacity import ComputeAdmission
from speech_serve.ingress.health import DeploymentStates, serve_deployment_states
from speech_serve.ingress.routes import Ingress
from speech_serve.ingress.speakers import SpeakerAdmin
from speech_serve.ingress.uploads import upload_gates
from speech_serve.messages import ModelsSummary
from speech_serve.settings import AppSettings

# The class as written, with its routes (Serve's wrapper above it adds an ASGI app and an async __del__)
INGRESS = next(c for c in Ingress.func_or_class.__mro__ if "healthz" in vars(c))


ADMIN_TOKEN = "admin-token-for-the-tests"


def probe(token: str | None = None) -> Request:
    """A GET /healthz, with the admin token or none (a kubelet's probe)."""
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    return Request({"type": "http", "method": "GET", "path": "/healthz", "query_string": b"", "headers": headers})


def bare_ingress(settings: AppSettings) -> INGRESS:
    """An Ingress with what its HTTP routes read, without Serve, models or a database."""
    ingress = object.__new__(INGRESS)
    ingress.models = ModelsSummary("test", {"asr": "tiny"})
    ingress.limits = settings.limits
    ingress.sessions = SimpleNamespace(live={}, watch_compute=lambda: None)
    ingress.compute = ComputeAdmission(settings.admission, compute=settings.compute)
    ingress.sizing = {"asr": {"replicas": 2}}
    ingress.device_auth = SimpleNamespace(enabled=False, why="test", problem=None)
    ingress.admin_auth = AdminAuth(ADMIN_TOKEN, "TEST_ADMIN_TOKEN_ENV")
    ingress.health = DeploymentStates(serve_deployment_states, settings.health.cache_s, settings.health.timeout_s)
    return ingress


class Blocking:
    """A synchronous call that waits for `release` (set by another coroutine) and records whether
    it came: it cannot while the call holds the event loop."""

    def __init__(self, answer):
        self.answer, self.release, self.released = answer, threading.Event(), None

    def __call__(self, *args, **kwargs):
        self.released = self.release.wait(timeout=5)
        return self.answer


async def alongside(route, release: threading.Event) -> tuple[object, list[str]]:
    """Run `route` while another coroutine wants the loop; the order both finished in."""
    order: list[str] = []

    async def other_session():
        await asyncio.sleep(0)
        order.append("other coroutine ran")
        release.set()

    async def probe():
        result = await route
        order.append("route answered")
        return result

    result, _ = await asyncio.gather(probe(), other_session())
    return result, order


def test_healthz_asks_the_serve_controller_off_the_event_loop(monkeypatch):
    running = SimpleNamespace(status=SimpleNamespace(value="HEALTHY"), replica_states={"RUNNING": 1})
    deployments = {"Ingress": running, "VADHost": running, "SenseVoice": running}
    status = Blocking(SimpleNamespace(applications={"speech": SimpleNamespace(deployments=deployments)}))
    monkeypatch.setattr(serve, "status", status)
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="speech"))
    ingress = bare_ingress(AppSettings())

    response, order = asyncio.run(alongside(ingress.healthz(probe(ADMIN_TOKEN)), status.release))
    assert status.released  # the controller call waited in a thread while the loop served others
    assert order == ["other coroutine ran", "route answered"]
    body = json.loads(response.body)
    assert response.status_code == 200 and body["deployments"]["SenseVoice"]["replicas"] == {"RUNNING": 1}
    assert body["load_this_replica"] == {"queue_delay_s": 0.0, "shedding": []}


def test_admin_routes_reach_sqlite_off_the_event_loop():
    store = SimpleNamespace(list=Blocking([]))
    ingress = bare_ingress(AppSettings())
    uploads = AppSettings().uploads
    ingress.speakers = SpeakerAdmin(store, None, AppSettings().voiceprints, uploads, upload_gates(uploads)[1])

    body, order = asyncio.run(alongside(ingress.list_speakers(None), store.list.release))
    assert store.list.released and order == ["other coroutine ran", "route answered"]
    assert body == {"speakers": []}


def test_concurrent_probes_share_one_controller_call_and_reuse_a_fresh_answer():
    """/healthz takes no credentials: a flood of probes must not become a flood of threads and
    controller calls."""
    calls: list[int] = []
    gate = threading.Event()

    def fetch():
        calls.append(1)
        gate.wait(timeout=5)
        return {"Ingress": {"status": "HEALTHY", "replicas": {"RUNNING": 1}}}

    now = [0.0]
    states = DeploymentStates(fetch, cache_s=1.0, timeout_s=10, clock=lambda: now[0])

    async def scenario():
        probes = [asyncio.ensure_future(states.get()) for _ in range(20)]
        await asyncio.sleep(0)
        gate.set()
        answers = await asyncio.gather(*probes)
        again = await states.get()  # within cache_s: no new call
        now[0] += 1.5
        fresh = await states.get()
        return answers, again, fresh

    answers, again, fresh = asyncio.run(scenario())
    assert len(set(map(json.dumps, answers))) == 1 and again == answers[0] == fresh
    assert len(calls) == 2  # the 20 concurrent probes shared one call; a stale answer made the second


def test_a_controller_that_does_not_answer_gives_an_error_not_a_hung_probe():
    gate = threading.Event()
    states = DeploymentStates(lambda: gate.wait(timeout=5), cache_s=1.0, timeout_s=0.05)

    async def scenario():
        try:
            await states.get()
        except TimeoutError:
            return "timed out"
        finally:
            gate.set()

    assert asyncio.run(scenario()) == "timed out"


@pytest.mark.parametrize("down, code, status", [
    ((), 200, "ok"),
    (("Speaker",), 200, "degraded"),  # who spoke is unknown for now; every transcript still comes
    (("Speaker", "SessionRegistry"), 200, "degraded"),
    (("VADHost",), 503, "starting"),
    (("SenseVoice",), 503, "starting"),
])  # fmt: skip
def test_readiness_is_the_transcript_path_and_the_rest_is_reported_as_degraded(monkeypatch, down, code, status):
    """A Speaker crash loop (or a GPU node replaced) must not take every pod out of the device Service."""

    def state(name):
        return SimpleNamespace(status=SimpleNamespace(value="HEALTHY"), replica_states={} if name in down else
                               {"RUNNING": 1})  # fmt: skip

    names = ("Ingress", "VADHost", "SenseVoice", "Speaker", "SessionRegistry")
    apps = {"speech": SimpleNamespace(deployments={name: state(name) for name in names})}
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=apps))
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="speech"))
    response = asyncio.run(bare_ingress(AppSettings()).healthz(probe()))
    body = json.loads(response.body)
    assert (response.status_code, body["status"]) == (code, status)
    assert body.get("no_running_replica", []) == sorted(down)


def test_no_interactive_api_pages_are_served():
    """/docs, /redoc and /openapi.json took no credentials and listed every admin route."""
    from fastapi.testclient import TestClient

    from speech_serve.ingress.routes import app

    client = TestClient(app)
    assert [client.get(path).status_code for path in ("/docs", "/redoc", "/openapi.json")] == [404, 404, 404]


def test_healthz_tells_a_probe_no_paths_or_variable_names_and_walks_no_tasks(monkeypatch):
    """/healthz is open: it listed model paths, the names of the secret variables, and walked every
    asyncio task of the replica on every probe. Those details now need the admin token."""
    walks = []  # Serve's ingress decorator copies the class with its own globals: patch those
    monkeypatch.setitem(INGRESS._health_details.__globals__, "live_stream_tasks", lambda: walks.append(1) or 0)
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={}))
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(app_name="speech"))
    ingress = bare_ingress(AppSettings())
    ingress.models = ModelsSummary("real", {"asr": "local: /srv/secret/models/sensevoice [int8 on CPU, x86 kernels]"})
    ingress.device_auth = SimpleNamespace(enabled=True, why="test", problem="set TEST_DEVICE_SECRET_ENV to 16+ chars")
    ingress.admin_auth = AdminAuth("", "TEST_ADMIN_TOKEN_ENV")
    public = asyncio.run(ingress.healthz(probe())).body.decode()
    assert "/srv/secret" not in public and "sensevoice [int8 on CPU" in public  # the name, and its precision
    assert "TEST_DEVICE_SECRET_ENV" not in public and "TEST_ADMIN_TOKEN_ENV" not in public
    assert not walks and "stream_tasks_this_replica" not in public
    ingress.admin_auth = AdminAuth(ADMIN_TOKEN, "TEST_ADMIN_TOKEN_ENV")
    assert "stream_tasks_this_replica" not in asyncio.run(ingress.healthz(probe("wrong-token"))).body.decode()
    detailed = json.loads(asyncio.run(ingress.healthz(probe(ADMIN_TOKEN))).body)
    assert walks and detailed["stream_tasks_this_replica"] == 0
    assert detailed["model_sources"]["asr"].startswith("local: /srv/secret/models")
    assert "TEST_DEVICE_SECRET_ENV" in detailed["device_auth"]["problem"]

"""An Ingress replica's sessions without Ray (sessions.py): its own cap, the session registry
(slow, restarted, or never answering), and the slot given back however a session ends."""

import asyncio

import pytest

from speech_serve.ingress.drain import DRAINING, DrainWatch
from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.sessions import replica_refusal
from speech_serve.settings import AppSettings
from speech_serve.wire.codes import CLOSE_TRY_AGAIN_LATER
from tests.support.fakes import PendingResponse


class AdmittedConn:
    """A connection as Sessions.serve sees it: authenticated (anonymous identity), then run; its
    run records its id in `ran` (when given) and returns, as if the client had left."""

    protocol = "plain"

    def __init__(self, session_id: str, ran: list[str] | None = None):
        from speech_serve.ingress.auth import Identity

        self.session_id, self.identity, self._ran = session_id, Identity(), ran

    async def authenticate(self, auth) -> bool:
        return True

    async def run(self) -> None:
        if self._ran is not None:
            self._ran.append(self.session_id)


def test_an_ingress_replica_refuses_past_its_own_cap_and_while_draining():
    assert replica_refusal(draining=False, live_here=149, max_per_replica=150) is None
    full = replica_refusal(draining=False, live_here=150, max_per_replica=150)
    assert full.code == "server_busy" and full.close_code == CLOSE_TRY_AGAIN_LATER and "150" in full.message
    assert replica_refusal(draining=True, live_here=0, max_per_replica=150) is DRAINING
    assert DRAINING.close_code == 1012


def test_the_slot_is_given_back_even_when_serve_cancels_the_request_as_its_client_leaves():
    """Serve (direct ingress) may cancel the WebSocket's request when the client goes: the
    registry release in its `finally` must still go out at once, not wait for the next sync."""
    from types import SimpleNamespace

    from speech_serve.ingress.sessions import Sessions

    class Registry:
        def __init__(self):
            self.released: list[str] = []
            outer = self

            async def admit(*args):
                return None

            async def release(session_id):
                await asyncio.sleep(0.05)  # a real call takes a while: the cancel lands during it
                outer.released.append(session_id)

            self.admit = SimpleNamespace(remote=admit)
            self.release = SimpleNamespace(remote=release)

    async def scenario():
        settings = AppSettings()
        registry = Registry()
        sessions = Sessions(registry, settings, None, IngressMetrics())
        sessions._drain = DrainWatch(None, "r", 1, 60, 10)  # no Serve here: background tasks stay off
        sessions._replica_id = "r"
        task = asyncio.create_task(sessions.serve(AdmittedConn("s9")))
        await asyncio.sleep(0.01)  # run() has returned; the release is on its way
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0.1)
        return registry.released

    assert asyncio.run(scenario()) == ["s9"]


def test_a_registry_that_never_answers_admits_unchecked_and_release_does_not_hang():
    """A restarting registry may take calls and not answer: new connections hung in admission for
    ever instead of taking the documented "admitted unchecked" way, and the release held the
    request open. Both calls are bounded by admission.registry_timeout_s and cancelled after it."""
    from types import SimpleNamespace

    from speech_serve.ingress.sessions import Sessions

    calls: list[PendingResponse] = []
    registry = SimpleNamespace(admit=SimpleNamespace(remote=lambda *args: PendingResponse(calls)),
                               release=SimpleNamespace(remote=lambda *args: PendingResponse(calls)))  # fmt: skip
    ran = []

    async def scenario():
        settings = AppSettings(admission={"registry_timeout_s": 0.05})
        sessions = Sessions(registry, settings, None, IngressMetrics())
        sessions._drain = DrainWatch(None, "r", 1, 60, 10)  # no Serve here: background tasks stay off
        sessions._replica_id = "r"
        await asyncio.wait_for(sessions.serve(AdmittedConn("s10", ran)), 5)
        return sessions

    sessions = asyncio.run(scenario())
    assert ran == ["s10"] and not sessions.live  # admitted unchecked, served, released
    assert len(calls) == 2 and all(call.cancelled for call in calls)  # admit, release: both given up


def test_the_first_admissions_use_the_running_asr_replica_count(monkeypatch):
    """The compute cap is sessions_per_asr_replica x running SenseVoice replicas. The count was
    refreshed only by the periodic sync, so devices arriving together at a fresh service were
    capped as if one replica ran (a sweep's first level of 16, cap 2 x 12, admitted 12)."""
    from types import SimpleNamespace

    from speech_serve.ingress import sessions as sessions_module
    from speech_serve.ingress.sessions import Sessions

    asked = []

    async def two_running(app, deployment):
        asked.append(deployment)
        await asyncio.sleep(0.01)  # the controller answers after the sessions have arrived
        return {"a": "RUNNING", "b": "RUNNING", "c": "STARTING"}

    monkeypatch.setattr(sessions_module, "controller_states", two_running)
    caps = []

    async def admit(session_id, replica, device, seq, cap):
        caps.append(cap)

    async def release(session_id):
        pass

    registry = SimpleNamespace(admit=SimpleNamespace(remote=admit), release=SimpleNamespace(remote=release))

    async def scenario():
        settings = AppSettings(compute={"sessions_per_asr_replica": 12})
        sessions = Sessions(registry, settings, None, IngressMetrics())
        sessions._drain = DrainWatch(None, "r", 1, 60, 10)  # no Serve here: background tasks stay off
        sessions._replica_id = "r"
        await asyncio.gather(*(sessions.serve(AdmittedConn(f"s{i}")) for i in range(3)))

    asyncio.run(scenario())
    assert caps[:3] == [24, 24, 24]  # two running replicas, counted once before the first admission
    assert asked == ["SenseVoice"]


def test_the_controller_is_looked_up_off_the_event_loop_once(monkeypatch):
    """controller_states runs on the loop every session shares (drain polls, syncs, the first
    admission); ray.get_actor is a blocking GCS call, so it runs in a worker thread, once, and
    again only after a call through the handle failed."""
    import threading
    from types import SimpleNamespace

    import ray

    from speech_serve.ingress import drain as drain_module

    lookups = []
    fail = [False]

    async def details(app, deployment):
        if fail[0]:
            raise RuntimeError("controller restarting")
        replica = SimpleNamespace(replica_id="r1", state=SimpleNamespace(value="RUNNING"))
        return SimpleNamespace(replicas=[replica])

    def get_actor(name, namespace):
        lookups.append(threading.current_thread() is threading.main_thread())
        return SimpleNamespace(get_deployment_details=SimpleNamespace(remote=details))

    monkeypatch.setattr(ray, "get_actor", get_actor)
    monkeypatch.setattr(drain_module, "_controller", None)

    async def scenario():
        first = await drain_module.controller_states("speech", "SenseVoice")
        await drain_module.controller_states("speech", "SenseVoice")
        fail[0] = True
        with pytest.raises(RuntimeError):
            await drain_module.controller_states("speech", "SenseVoice")
        fail[0] = False
        await drain_module.controller_states("speech", "SenseVoice")
        return first

    assert asyncio.run(scenario()) == {"r1": "RUNNING"}
    assert lookups == [False, False]  # in a worker thread; once, then once more after the failure


def test_a_registry_restarted_empty_counts_the_live_sessions_and_devices_again_after_one_sync():
    """The registry replica is lost with its node and Serve starts an empty one. Before the fix
    the Ingress syncs only dropped sessions, so the new registry never counted the live ones: the
    overall cap and a device's connection limit were exceeded by everything still connected."""
    from types import SimpleNamespace

    from speech_serve.ingress.auth import Identity
    from speech_serve.ingress.sessions import Sessions
    from speech_serve.replicas.registry import SessionRegistry
    from speech_serve.wire.codes import CLOSE_POLICY

    settings = AppSettings(admission={"max_connections_per_device": 2, "max_sessions_total": 10})
    registries = [SessionRegistry.func_or_class(settings.admission)]  # the real class, without Serve

    def method(name):
        async def call(*args):
            return getattr(registries[-1], name)(*args)

        return SimpleNamespace(remote=call)

    handle = SimpleNamespace(**{name: method(name) for name in ("admit", "release", "sync")})

    class Device:
        protocol = "plain"

        def __init__(self, session_id: str):
            self.session_id, self.identity = session_id, Identity(device_id="dev-1")
            self.leave, self.refused = asyncio.Event(), None

        async def authenticate(self, auth) -> bool:
            return True

        async def run(self) -> None:
            await self.leave.wait()

        async def refuse(self, refusal) -> None:
            self.refused = refusal

    async def scenario():
        sessions = Sessions(handle, settings, None, IngressMetrics())
        sessions._drain = DrainWatch(None, "r", 1, 60, 10)  # no Serve here: background tasks stay off
        sessions._replica_id = "r"
        devices = [Device("s1"), Device("s2")]
        tasks = [asyncio.create_task(sessions.serve(d)) for d in devices]
        await asyncio.sleep(0.05)
        assert registries[-1].live() == 2 and set(sessions.live) == {"s1", "s2"}
        registries.append(SessionRegistry.func_or_class(settings.admission))  # lost with its node, restarted
        assert registries[-1].live() == 0
        await sessions.sync_once()
        third = Device("s3")
        await sessions.serve(third)  # the device's third connection
        for d in devices:
            d.leave.set()
        await asyncio.gather(*tasks)
        return registries[-1], third

    registry, third = asyncio.run(scenario())
    assert third.refused is not None and third.refused.code == "too_many_connections"
    assert third.refused.close_code == CLOSE_POLICY
    assert registry.live() == 0  # both released to the new registry


@pytest.mark.parametrize("cap", ["replica", "compute"])
def test_a_burst_during_a_registry_outage_cannot_pass_the_caps(cap):
    """Sessions waiting on a registry that does not answer were not counted: a burst all passed the
    replica's cap (`live` was empty while they waited), then were admitted unchecked, past the
    compute cap too."""
    from types import SimpleNamespace

    from speech_serve.ingress.sessions import Sessions

    calls: list[PendingResponse] = []
    registry = SimpleNamespace(admit=SimpleNamespace(remote=lambda *args: PendingResponse(calls)),
                               release=SimpleNamespace(remote=lambda *args: PendingResponse(calls)))  # fmt: skip

    class HeldConn(AdmittedConn):
        def __init__(self, session_id, refused, release):
            super().__init__(session_id)
            self.refused, self.release = refused, release

        async def refuse(self, refusal):
            self.refused.append(refusal.code)

        async def run(self):
            await self.release.wait()  # stays live until the burst is over

    async def scenario():
        admission = {"registry_timeout_s": 0.1, "max_sessions_per_replica": 3 if cap == "replica" else 100}
        compute = {"sessions_per_asr_replica": 4 if cap == "compute" else None}
        settings = AppSettings(admission=admission, compute=compute)
        sessions = Sessions(registry, settings, None, IngressMetrics())
        sessions._drain = DrainWatch(None, "r", 1, 60, 10)  # no Serve here: background tasks stay off
        sessions._replica_id = "r"
        sessions._asr_counted = asyncio.get_running_loop().create_future()  # counted: no Serve controller here
        sessions._asr_counted.set_result(None)
        sessions._counted_at = float("inf")  # (a count in a thread would start a local Ray in this process)
        refused, release = [], asyncio.Event()
        burst = [asyncio.create_task(sessions.serve(HeldConn(f"s{i}", refused, release))) for i in range(10)]
        await asyncio.sleep(0.5)  # every admission has timed out at the registry by now
        admitted = len(sessions.live)
        release.set()
        await asyncio.wait_for(asyncio.gather(*burst), 5)
        return admitted, refused

    admitted, refused = asyncio.run(scenario())
    assert admitted == (3 if cap == "replica" else 4) and refused == ["server_busy"] * (10 - admitted)

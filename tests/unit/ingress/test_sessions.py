"""An Ingress replica's sessions without Ray: its own cap, draining (the stop detection, the timing
plan, and a session asked to reconnect: a real PlainConnection over an in-memory WebSocket), and
sessions closed for idling or for never saying hello."""

import asyncio
import json

import pytest

from speech_serve.ingress.connection import DRAINING
from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.protocols.plain import PlainConnection
from speech_serve.ingress.recognition import ModelCalls, UtteranceStreams
from speech_serve.ingress.sessions import DrainPlan, DrainWatch, replica_is_stopping, replica_refusal
from speech_serve.messages import CLOSE_SERVICE_RESTART, CLOSE_TRY_AGAIN_LATER, VadFeedResult, VadItem
from speech_serve.settings import AppSettings


def connection(cls, ws, settings: AppSettings, session_id: str, *extra, vad=None):
    """A connection with no deployments behind it (fine as long as no audio is sent), or only `vad`."""
    metrics = IngressMetrics()
    models = ModelCalls(vad, None, None, settings.retry, "test")
    streams = UtteranceStreams(models, settings.ingress, settings.speaker.keep_embeddings, metrics)
    return cls(ws, session_id, streams, settings.ingress, metrics, *extra)


def test_only_a_listed_stopping_replica_is_draining():
    states = {"a": "RUNNING", "b": "STOPPING"}
    assert replica_is_stopping(states, "b")
    assert not replica_is_stopping(states, "a")
    assert not replica_is_stopping(states, "c")  # unknown: never cut sessions on a guess
    assert not replica_is_stopping({}, "b")


def test_plan_asks_to_reconnect_margin_before_the_deadline():
    plan = DrainPlan(started=100.0, grace_s=600.0, margin_s=30.0)
    assert plan.reconnect_in(100.0) == 570.0
    assert plan.reconnect_in(669.0) == 1.0
    assert plan.reconnect_in(700.0) == 0.0
    assert DrainPlan(started=0.0, grace_s=20.0, margin_s=30.0).reconnect_in(0.0) == 0.0  # grace shorter: at once


def test_watch_polls_until_stopping_and_survives_controller_errors():
    replies = [RuntimeError("controller restarting"), {"me": "RUNNING"}, {"me": "STOPPING", "other": "RUNNING"}]
    calls = []

    async def fetch():
        calls.append(1)
        reply = replies[len(calls) - 1]
        if isinstance(reply, Exception):
            raise reply
        return reply

    watch = DrainWatch(fetch, "me", poll_s=0.001, grace_s=60, margin_s=10)
    assert not watch.draining
    plan = asyncio.run(asyncio.wait_for(watch.wait(), 5))
    assert watch.draining and len(calls) == 3
    assert (plan.grace_s, plan.margin_s) == (60, 10)


class MemoryWebSocket:
    """The slice of Starlette's WebSocket the handlers use; the client side is a queue."""

    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent: list[dict] = []
        self.closed: tuple[int, str] | None = None

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = (code, reason)


def test_idle_session_asked_to_reconnect_gets_1012_and_a_reconnect_frame():
    async def scenario():
        ws = MemoryWebSocket()
        # No audio is sent, so no deployment is called: the handles can be absent.
        handler = connection(PlainConnection, ws, AppSettings(), "s1")
        session = asyncio.create_task(handler.run())
        await asyncio.sleep(0.05)
        assert not session.done() and ws.sent[0]["type"] == "ready"  # blocked waiting for the client
        handler.ask_to_reconnect(within_s=5)
        await asyncio.wait_for(session, 2)
        return ws

    ws = asyncio.run(scenario())
    assert ws.closed[0] == CLOSE_SERVICE_RESTART
    assert ws.sent[-1]["type"] == "error" and ws.sent[-1]["code"] == "reconnect"


def test_frames_still_arrive_in_order_when_no_reconnect_is_asked():
    async def scenario():
        ws = MemoryWebSocket()
        handler = connection(PlainConnection, ws, AppSettings(), "s2")
        session = asyncio.create_task(handler.run())
        for _ in range(3):
            ws.inbox.put_nowait({"type": "websocket.receive", "text": json.dumps({"type": "start", "language": "en"})})
        while len(ws.sent) < 4:  # every frame answered before the client leaves
            await asyncio.sleep(0.01)
        ws.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(session, 2)
        return ws

    ws = asyncio.run(scenario())
    assert [m["type"] for m in ws.sent] == ["ready"] * 4  # one at connect, one per start
    assert ws.closed is None  # the client left; nothing to close


def test_a_session_that_sends_nothing_is_closed_for_idling():
    async def scenario():
        ws = MemoryWebSocket()
        settings = AppSettings(ingress={"idle_timeout_s": 0.2})
        handler = connection(PlainConnection, ws, settings, "s1")
        await asyncio.wait_for(handler.run(), 5)
        return ws

    ws = asyncio.run(scenario())
    assert ws.sent[0]["type"] == "ready"
    assert ws.sent[-1]["code"] == "idle_timeout" and ws.closed[0] == 1000


def test_an_ingress_replica_refuses_past_its_own_cap_and_while_draining():
    assert replica_refusal(draining=False, live_here=149, max_per_replica=150) is None
    full = replica_refusal(draining=False, live_here=150, max_per_replica=150)
    assert full.code == "server_busy" and full.close_code == CLOSE_TRY_AGAIN_LATER and "150" in full.message
    assert replica_refusal(draining=True, live_here=0, max_per_replica=150) is DRAINING
    assert DRAINING.close_code == 1012


def test_a_device_that_sends_no_hello_is_closed_after_the_hello_timeout():
    from speech_serve.ingress.protocols.xiaozhi import XiaozhiConnection

    async def scenario():
        ws = MemoryWebSocket()
        ws.headers, ws.query_params = {"device-id": "02:00:00:00:00:09", "protocol-version": "1"}, {}
        settings = AppSettings(xiaozhi={"hello_timeout_s": 0.2})
        handler = connection(XiaozhiConnection, ws, settings, "s1", settings.xiaozhi)
        await asyncio.wait_for(handler.run(), 5)
        return ws

    ws = asyncio.run(scenario())
    assert ws.sent[-1]["code"] == "hello_timeout" and ws.closed[0] == 1002


class HungResponse:
    """A Serve response that answers only when told (a VADHost far behind); records a cancel."""

    def __init__(self, calls: list):
        self.future = asyncio.get_running_loop().create_future()
        self.cancelled = False
        calls.append(self)

    def __await__(self):
        return self.future.__await__()

    def cancel(self) -> None:
        self.cancelled = True



class AdmittedConn:
    """A connection as Sessions.serve sees it: authenticated (anonymous identity), then run; its
    run records its id in `ran` (when given) and returns, as if the client had left."""

    protocol = "plain"

    def __init__(self, session_id: str, ran: list[str] | None = None):
        from speech_serve.ingress.security import Identity

        self.session_id, self.identity, self._ran = session_id, Identity(), ran

    async def authenticate(self, auth) -> bool:
        return True

    async def run(self) -> None:
        if self._ran is not None:
            self._ran.append(self.session_id)

class HungVad:
    """A VADHost whose batched calls answer only when the test says so."""

    def __init__(self):
        self.calls: list[tuple[list[VadItem], HungResponse]] = []
        responses: list[HungResponse] = []

        def remote(_self, lane, items):
            response = HungResponse(responses)
            self.calls.append((items, response))
            return response

        self.feed_many = type("Method", (), {"remote": remote})()


def test_a_client_that_leaves_while_its_frames_wait_is_dropped_at_once_with_its_work():
    """The frame loop is stuck in a VAD call with more audio queued behind it when the client
    disconnects: the session ends at once without reading the rest (the slot is freed by the
    caller as soon as run() returns). The VAD call in flight (its lane's batch) is left to finish,
    not cancelled, and the session's VAD state is freed right after it, in the same lane."""

    async def scenario():
        ws = MemoryWebSocket()
        vad = HungVad()
        handler = connection(PlainConnection, ws, AppSettings(), "s3", vad=vad)
        session = asyncio.create_task(handler.run())
        for _ in range(5):  # 5 x 200 ms of audio: the first chunk goes to the VAD and hangs there
            ws.inbox.put_nowait({"type": "websocket.receive", "bytes": bytes(6400)})
        while not vad.calls:
            await asyncio.sleep(0.01)
        ws.inbox.put_nowait({"type": "websocket.disconnect", "code": 1001})
        await asyncio.wait_for(session, 5)  # would hang for ever if it waited for the VAD
        await asyncio.sleep(0.2)
        calls_while_feed_open = len(vad.calls)
        items, response = vad.calls[0]
        response.future.set_result([VadFeedResult(events=[]) for _ in items])  # the VADHost answers at last
        await asyncio.sleep(0.2)  # the lane's next call (the close) goes out now
        return vad, calls_while_feed_open

    vad, calls_while_feed_open = asyncio.run(scenario())
    first_items, first = vad.calls[0]
    assert [item.session_id for item in first_items] == ["s3"] and first_items[0].chunk is not None
    assert not first.cancelled  # the rest was never fed; nothing cut mid-route
    assert calls_while_feed_open == 1  # one call in flight per lane: the close waited behind the feed
    assert len(vad.calls) == 2 and vad.calls[1][0] == [VadItem("s3", None)]  # then the state is freed, once


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
        sessions = Sessions(registry, settings.admission, settings.ingress, None, IngressMetrics())
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

    calls: list[HungResponse] = []
    registry = SimpleNamespace(admit=SimpleNamespace(remote=lambda *args: HungResponse(calls)),
                               release=SimpleNamespace(remote=lambda *args: HungResponse(calls)))  # fmt: skip
    ran = []

    async def scenario():
        settings = AppSettings(admission={"registry_timeout_s": 0.05})
        sessions = Sessions(registry, settings.admission, settings.ingress, None, IngressMetrics())
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
        settings = AppSettings(admission={"sessions_per_asr_replica": 12})
        sessions = Sessions(registry, settings.admission, settings.ingress, None, IngressMetrics())
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

    from speech_serve.ingress import sessions as sessions_module

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
    monkeypatch.setattr(sessions_module, "_controller", None)

    async def scenario():
        first = await sessions_module.controller_states("speech", "SenseVoice")
        await sessions_module.controller_states("speech", "SenseVoice")
        fail[0] = True
        with pytest.raises(RuntimeError):
            await sessions_module.controller_states("speech", "SenseVoice")
        fail[0] = False
        await sessions_module.controller_states("speech", "SenseVoice")
        return first

    assert asyncio.run(scenario()) == {"r1": "RUNNING"}
    assert lookups == [False, False]  # in a worker thread; once, then once more after the failure


def test_a_registry_restarted_empty_counts_the_live_sessions_and_devices_again_after_one_sync():
    """The registry replica is lost with its node and Serve starts an empty one. Before the fix
    the Ingress syncs only dropped sessions, so the new registry never counted the live ones: the
    overall cap and a device's connection limit were exceeded by everything still connected."""
    from types import SimpleNamespace

    from speech_serve.ingress.security import Identity
    from speech_serve.ingress.sessions import Sessions
    from speech_serve.messages import CLOSE_POLICY
    from speech_serve.replicas.registry import SessionRegistry

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
        sessions = Sessions(handle, settings.admission, settings.ingress, None, IngressMetrics())
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

"""Who a connection is, decided once: the credentials are parsed by one parser, authenticated,
and the session is admitted (registry, slot, metrics) under that same id; its speaker group
comes from that identity when device authentication is on; the admitted id stays the session's
whatever its streams are called. Real connections over an in-memory WebSocket, no Ray."""

import asyncio
import json
from types import SimpleNamespace

import pytest

from speech_serve.ingress import auth as security
from speech_serve.ingress.auth import DeviceAuth, device_credentials
from speech_serve.ingress.drain import DrainWatch
from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.protocols.funasr import FunasrConnection
from speech_serve.ingress.protocols.plain import PlainConnection
from speech_serve.ingress.protocols.xiaozhi import XiaozhiConnection
from speech_serve.ingress.sessions import Sessions
from speech_serve.messages import VadFeedResult
from speech_serve.settings import AppSettings, FunasrSettings
from speech_serve.wire.codes import CLOSE_POLICY
from speech_serve.wire.tokens import issue_token
from tests.support.fakes import MemoryWebSocket, connection

SECRET = "unit-test-device-secret"
OFF = DeviceAuth(enabled=False)


def device_auth(allowed=(), groups=None) -> DeviceAuth:
    mapping = {"device_groups": groups} if groups else {}
    return DeviceAuth(True, SECRET, 3600, frozenset(allowed), "TEST_SECRET", "unit test", **mapping)


class Registry:
    """The session registry's calls, recorded."""

    def __init__(self):
        self.admitted: list[tuple[str, str | None]] = []
        self.released: list[str] = []

        async def admit(session_id, replica, device, seq, cap):
            self.admitted.append((session_id, device))

        async def release(session_id):
            self.released.append(session_id)

        self.admit, self.release = SimpleNamespace(remote=admit), SimpleNamespace(remote=release)


class AnsweringVad:
    """A VADHost that hears no speech; records which stream ids it was fed."""

    def __init__(self):
        self.ids: list[str] = []

        async def remote(lane, items):
            self.ids += [item.session_id for item in items]
            return [VadFeedResult(events=[]) for _ in items]

        self.feed_many = SimpleNamespace(remote=remote)


def sessions_with(registry: Registry, auth: DeviceAuth) -> Sessions:
    settings = AppSettings()
    sessions = Sessions(registry, settings, auth, IngressMetrics())
    sessions._drain = DrainWatch(None, "r", 1, 60, 10)  # no Serve here: background tasks stay off
    sessions._replica_id = "r"
    return sessions


def websocket(path: str, headers=None, query=None) -> MemoryWebSocket:
    ws = MemoryWebSocket()
    ws.headers, ws.query_params, ws.scope = headers or {}, query or {}, {"path": path, "query_string": b""}
    return ws


def text(body: dict) -> dict:
    return {"type": "websocket.receive", "text": json.dumps(body)}


GONE = {"type": "websocket.disconnect", "code": 1000}


async def _stream_group(cls, ws, auth, first_frames, *extra):
    """The speaker group the connection's stream ends up with, and what the client was sent."""
    registry = Registry()
    sessions = sessions_with(registry, auth)
    conn = connection(cls, ws, AppSettings(), "s1", *extra, vad=AnsweringVad())
    for frame in first_frames:
        ws.inbox.put_nowait(frame)
    ws.inbox.put_nowait({"type": "websocket.receive", "bytes": bytes(6400)})  # opens the stream
    session = asyncio.create_task(sessions.serve(conn))
    for _ in range(500):
        if conn.stream is not None:
            break
        await asyncio.sleep(0.01)
    group = conn.stream.options.speaker_group
    ws.inbox.put_nowait(GONE)
    await asyncio.wait_for(session, 5)
    return group, ws.sent


KITCHEN = {"device_id": "kitchen", "token": issue_token(SECRET, "", "kitchen")}


def test_a_funasr_connection_with_two_files_releases_the_id_it_was_admitted_under():
    async def scenario():
        registry, vad = Registry(), AnsweringVad()
        sessions = sessions_with(registry, OFF)
        ws = websocket("/funasr")
        conn = connection(FunasrConnection, ws, AppSettings(), "s1", FunasrSettings(), vad=vad)
        for frame in (text({"mode": "offline", "wav_name": "a"}), text({"is_speaking": False}),
                      text({"mode": "offline", "wav_name": "b"}), text({"is_speaking": False})):  # fmt: skip
            ws.inbox.put_nowait(frame)
        session = asyncio.create_task(sessions.serve(conn))
        for _ in range(1000):  # until both files are answered (a disconnect drops unread frames)
            if sum(1 for m in ws.sent if m.get("is_end")) == 2:
                break
            await asyncio.sleep(0.01)
        ws.inbox.put_nowait(GONE)
        await asyncio.wait_for(session, 10)
        await asyncio.sleep(0.05)  # the background VAD closes
        return registry, sessions, ws, vad, conn

    registry, sessions, ws, vad, conn = asyncio.run(scenario())
    assert [m["wav_name"] for m in ws.sent if m.get("is_end")] == ["a", "b"]  # both files answered
    assert registry.admitted == [("s1", None)] and registry.released == ["s1"]
    assert sessions.live == {} and conn.session_id == "s1"
    assert set(vad.ids) == {"s1", "s1-2"}  # each file has its own VAD state
    with pytest.raises(AttributeError):
        conn.session_id = "renamed"  # the admitted id cannot be changed by a protocol


@pytest.mark.parametrize(
    "headers, query",
    [
        ({}, {"device-id": "A", "device_id": "B"}),
        ({"device-id": "A"}, {"device_id": "B"}),
        ({}, {"client-id": "c1", "client_id": "c2", "device_id": "A"}),
        ({"authorization": "Bearer x.1"}, {"token": "y.2", "device_id": "A"}),
    ],
)
def test_a_credential_given_two_ways_with_different_values_is_refused(headers, query):
    with pytest.raises(security.CredentialError) as err:
        device_credentials(headers, query)
    assert err.value.status == 400 and "two different values" in str(err.value)


def test_the_same_value_given_two_ways_is_fine():
    creds = device_credentials({"device-id": "A"}, {"device_id": "A", "device-id": "A", "token": "t.1"})
    assert (creds.device_id, creds.authorization) == ("A", "t.1")


def test_a_repeated_query_parameter_with_different_values_is_refused():
    from starlette.datastructures import QueryParams

    with pytest.raises(security.CredentialError):
        device_credentials({}, QueryParams("device_id=A&device_id=B"))


@pytest.mark.parametrize("protocol", ["xiaozhi", "plain", "funasr"])
def test_a_device_id_given_two_ways_is_refused_before_any_admission(protocol):
    """`?device-id=A&device_id=B` with B's token: refused (1008), never admitted nor counted."""
    token = issue_token(SECRET, "", "B")

    async def scenario():
        registry = Registry()
        sessions = sessions_with(registry, device_auth())
        query = {"device-id": "A", "device_id": "B", "token": token}
        ws = websocket("/x", {"protocol-version": "1"}, query)
        settings = AppSettings()
        cls, extra = {"xiaozhi": (XiaozhiConnection, (settings.xiaozhi,)), "plain": (PlainConnection, ()),
                      "funasr": (FunasrConnection, (FunasrSettings(),))}[protocol]  # fmt: skip
        await asyncio.wait_for(sessions.serve(connection(cls, ws, settings, "s1", *extra)), 5)
        return registry, ws

    registry, ws = asyncio.run(scenario())
    assert registry.admitted == [] and ws.closed[0] == CLOSE_POLICY
    assert "two different values" in json.dumps(ws.sent[-1])


def test_a_xiaozhi_device_refused_by_auth_is_never_admitted_and_an_accepted_one_is_counted_as_itself():
    async def scenario(query):
        registry = Registry()
        sessions = sessions_with(registry, device_auth())
        ws = websocket("/xiaozhi/v1/", {"protocol-version": "1", "client-id": "c"}, query)
        ws.inbox.put_nowait(GONE)
        settings = AppSettings()
        await asyncio.wait_for(sessions.serve(connection(XiaozhiConnection, ws, settings, "s1", settings.xiaozhi)), 5)
        return registry, ws

    refused, ws = asyncio.run(scenario({"device-id": "A", "token": issue_token(SECRET, "c", "B")}))
    assert refused.admitted == [] and ws.closed[0] == CLOSE_POLICY
    admitted, _ = asyncio.run(scenario({"device-id": "A", "token": issue_token(SECRET, "c", "A")}))
    assert admitted.admitted == [("s1", "A")]


@pytest.mark.parametrize(
    "cls, start, extra",
    [
        (PlainConnection, {"type": "start", "speaker_group": "neighbours"}, ()),
        (FunasrConnection, {"mode": "offline", "speaker_group": "neighbours"}, (FunasrSettings(),)),
    ],
)
def test_with_device_auth_a_client_cannot_choose_whose_voiceprints_it_is_matched_against(cls, start, extra):
    group, sent = asyncio.run(_stream_group(cls, websocket("/x", query=KITCHEN), device_auth(), [text(start)], *extra))
    assert group == "device:kitchen"  # the device's own group
    assert any(m.get("code") == "speaker_group_not_allowed" for m in sent)  # told, and the session goes on


@pytest.mark.parametrize(
    "cls, start, extra",
    [(PlainConnection, {"type": "start"}, ()), (FunasrConnection, {"mode": "offline"}, (FunasrSettings(),))],
)
def test_with_device_auth_a_device_is_matched_in_its_mapped_group_or_its_own(cls, start, extra):
    mapped = device_auth(groups={"kitchen": "home-1"})
    group, _ = asyncio.run(_stream_group(cls, websocket("/x", query=KITCHEN), mapped, [text(start)], *extra))
    assert group == "home-1"
    own, _ = asyncio.run(_stream_group(cls, websocket("/x", query=KITCHEN), device_auth(), [text(start)], *extra))
    assert own == "device:kitchen"  # an unmapped device: a group of its own, never a household named like it
    same = {**start, "speaker_group": "home-1"}  # naming its own group is fine
    group, sent = asyncio.run(_stream_group(cls, websocket("/x", query=KITCHEN), mapped, [text(same)], *extra))
    assert group == "home-1" and not any(m.get("code") == "speaker_group_not_allowed" for m in sent)


def test_without_device_auth_the_client_still_chooses():
    start = text({"type": "start", "speaker_group": "home-2"})
    group, _ = asyncio.run(_stream_group(PlainConnection, websocket("/x"), OFF, [start]))
    assert group == "home-2"

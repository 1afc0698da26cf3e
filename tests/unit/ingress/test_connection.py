"""The receive loop every protocol shares (connection.py), over an in-memory WebSocket: a session
asked to reconnect, frames in order, idling, and a client that leaves with frames still queued."""

import asyncio
import json

from speech_serve.ingress.protocols.plain import PlainConnection
from speech_serve.messages import VadFeedResult, VadItem
from speech_serve.settings import AppSettings
from speech_serve.wire.codes import CLOSE_SERVICE_RESTART
from tests.support.fakes import HungVad, MemoryWebSocket, QuietVad, connection


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
        settings = AppSettings(limits={"idle_timeout_s": 0.2})
        handler = connection(PlainConnection, ws, settings, "s1")
        await asyncio.wait_for(handler.run(), 5)
        return ws

    ws = asyncio.run(scenario())
    assert ws.sent[0]["type"] == "ready"
    assert ws.sent[-1]["code"] == "idle_timeout" and ws.closed[0] == 1000


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


def test_a_request_cancelled_by_serve_stops_its_frame_loop_before_the_stream_is_dropped():
    """In direct-ingress (HAProxy) mode Serve cancels the request when its client leaves, instead of
    handing it a disconnect. The frame loop must end with it: left running, it would read the frames
    still queued, open a new stream under the same session id and leave its VAD state behind."""

    async def scenario():
        ws = MemoryWebSocket()
        vad = QuietVad()
        handler = connection(PlainConnection, ws, AppSettings(), "s4", vad=vad)
        session = asyncio.create_task(handler.run())
        for _ in range(20):  # audio queued behind the first chunks when Serve cancels the request
            ws.inbox.put_nowait({"type": "websocket.receive", "bytes": bytes(6400)})
        while not vad.items:
            await asyncio.sleep(0)
        session.cancel()
        await asyncio.gather(session, return_exceptions=True)
        await asyncio.sleep(0.3)  # anything left running would feed more audio now
        return vad

    vad = asyncio.run(scenario())
    closes = [i for i, item in enumerate(vad.items) if item.chunk is None]
    assert len(closes) == 1 and closes[0] == len(vad.items) - 1, vad.items  # freed once, and nothing after it
    starts = [item for item in vad.items if item.chunk is not None and item.chunk.start_ms == 0]
    assert len(starts) == 1  # one stream, never reopened


def test_a_close_reason_fits_the_close_frame_in_bytes_not_characters():
    """A refusal message holding non-ASCII text (a device id, a group name) was cut to 120 characters:
    up to 480 bytes, past the 123 a close frame holds, so the close failed and the client saw 1006."""

    async def scenario():
        ws = MemoryWebSocket()
        handler = connection(PlainConnection, ws, AppSettings(), "s5")
        await handler.close_with_error("unauthorized", "设备 " * 60, 1008)
        return ws

    code, reason = asyncio.run(scenario()).closed
    assert code == 1008 and len(reason.encode("utf-8")) <= 123 and reason.startswith("unauthorized: 设备")

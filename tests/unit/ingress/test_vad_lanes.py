"""VadLanes: the batched VADHost calls of an Ingress replica, without Ray (a fake `send`)."""

import asyncio

import numpy as np
import pytest
from ray.serve.context import _get_serve_request_context

from speech_serve.ingress.vad_lanes import VadItemError, VadLanes
from speech_serve.messages import VadChunk, VadFeedResult, VadItem


def chunk(start_ms: int = 0) -> VadChunk:
    return VadChunk(np.zeros(3200, dtype=np.int16), start_ms)


class FakeVad:
    """Records each call (lane, items) and answers when the test releases it."""

    def __init__(self):
        self.calls: list[tuple[str, list[VadItem]]] = []
        self.gates: list[asyncio.Future] = []
        self.request_ids: list[str] = []
        self.fail_session: str | None = None

    async def send(self, lane: str, items: list[VadItem]) -> list[VadFeedResult]:
        self.calls.append((lane, items))
        self.request_ids.append(_get_serve_request_context()._internal_request_id)
        gate = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        await gate
        return [VadFeedResult(events=[], error="bad" if it.session_id == self.fail_session else None) for it in items]

    def release(self, i: int = -1) -> None:
        self.gates[i].set_result(None)


def test_chunks_that_arrive_while_a_call_is_out_go_together_in_the_next_one():
    async def scenario():
        vad = FakeVad()
        lanes = VadLanes(vad.send, interval_ms=0, sessions_per_lane=50, prefix="i")
        first = asyncio.create_task(lanes.feed("a", chunk()))
        await asyncio.sleep(0.01)
        later = [asyncio.create_task(lanes.feed(s, chunk())) for s in ("b", "c", "d")]
        await asyncio.sleep(0.01)
        assert len(vad.calls) == 1  # one call in flight per lane
        vad.release(0)
        await first
        await asyncio.sleep(0.01)
        assert [it.session_id for it in vad.calls[1][1]] == ["b", "c", "d"]
        vad.release(1)
        await asyncio.gather(*later)
        return vad, lanes

    vad, lanes = asyncio.run(scenario())
    assert [lane for lane, _ in vad.calls] == ["i-0", "i-0"] and lanes.calls == 2


def test_calls_of_a_lane_are_at_least_the_interval_apart():
    async def scenario():
        vad = FakeVad()
        lanes = VadLanes(vad.send, interval_ms=200, sessions_per_lane=50)
        loop = asyncio.get_running_loop()
        sent_at = []
        original = vad.send

        async def timed(lane, items):
            sent_at.append(loop.time())
            return await original(lane, items)

        lanes._send = timed
        task = asyncio.create_task(lanes.feed("a", chunk()))
        await asyncio.sleep(0.01)
        vad.release(0)
        await task
        task = asyncio.create_task(lanes.feed("a", chunk(200)))  # answered at once: must still wait
        while len(vad.gates) < 2:
            await asyncio.sleep(0.01)
        vad.release(1)
        await task
        return sent_at

    first, second = asyncio.run(scenario())
    assert second - first >= 0.19


def test_sessions_fill_a_lane_then_open_the_next_and_leave_on_close():
    async def scenario():
        vad = FakeVad()
        lanes = VadLanes(vad.send, interval_ms=0, sessions_per_lane=2, prefix="i")
        assert [lanes.lane_of(s) for s in ("a", "b", "c", "a")] == ["i-0", "i-0", "i-1", "i-0"]
        closing = asyncio.create_task(lanes.close("b"))
        await asyncio.sleep(0.01)
        assert vad.calls == [("i-0", [VadItem("b", None)])]
        assert lanes.lane_of("d") == "i-0"  # b's place is free at once; its close still goes out in order
        vad.release(0)
        await closing
        return lanes

    lanes = asyncio.run(scenario())
    assert lanes.sessions == 3  # a, c, d


def test_a_session_that_leaves_does_not_take_the_batch_with_it():
    async def scenario():
        vad = FakeVad()
        lanes = VadLanes(vad.send, interval_ms=0, sessions_per_lane=50)
        gone = asyncio.create_task(lanes.feed("gone", chunk()))
        stays = asyncio.create_task(lanes.feed("stays", chunk()))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        vad.release(0)
        return await stays

    assert asyncio.run(scenario()).error is None


def test_a_failed_call_reaches_every_session_of_its_batch_and_a_failed_item_only_its_own():
    async def scenario():
        vad = FakeVad()
        lanes = VadLanes(vad.send, interval_ms=0, sessions_per_lane=50)
        vad.fail_session = "bad"
        tasks = [asyncio.create_task(lanes.feed(s, chunk())) for s in ("bad", "good")]
        await asyncio.sleep(0.01)
        vad.release(0)
        item_results = await asyncio.gather(*tasks, return_exceptions=True)

        async def broken(lane, items):
            raise ConnectionError("replica gone")

        lanes._send = broken
        call_results = await asyncio.gather(lanes.feed("x", chunk()), lanes.feed("y", chunk()), return_exceptions=True)
        return item_results, call_results

    (bad, good), (x, y) = asyncio.run(scenario())
    assert isinstance(bad, VadItemError) and isinstance(good, VadFeedResult)
    assert isinstance(x, ConnectionError) and isinstance(y, ConnectionError)


def test_each_call_has_a_request_id_of_its_own_not_the_calling_sessions():
    """Serve's router cannot route two pending requests with one request id, and every call made
    for one WebSocket shares the session's: a lane's call must not inherit the id of whichever
    session started it."""
    from ray.serve.context import _RequestContext, _serve_request_context

    async def scenario():
        vad = FakeVad()
        lanes = VadLanes(vad.send, interval_ms=0, sessions_per_lane=1)

        async def session(sid: str):
            _serve_request_context.set(_RequestContext(_internal_request_id="websocket-of-" + sid))
            return await lanes.feed(sid, chunk())

        tasks = [asyncio.create_task(session(s)) for s in ("a", "b")]
        await asyncio.sleep(0.01)
        vad.release(0)
        vad.release(1)
        await asyncio.gather(*tasks)
        return vad.request_ids

    ids = asyncio.run(scenario())
    assert len(ids) == 2 and not any(i.startswith("websocket-of-") for i in ids)


def test_a_lane_holds_at_least_one_session():
    with pytest.raises(ValueError):
        VadLanes(lambda lane, items: None, interval_ms=0, sessions_per_lane=0)

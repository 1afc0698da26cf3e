"""Calls to the replicas (stream/calls.py): the retry clock, tries bounded and cancelled on their
replica, VAD replays, and the VAD lanes' batching (pure asyncio, no Ray)."""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from ray.serve.context import _get_serve_request_context

from speech_serve.ingress.stream.calls import ModelCalls, ReplicaLostError, RetryClock, VadItemError, VadLanes, bounded
from speech_serve.ingress.stream.timeline import Timeline
from speech_serve.messages import AsrRequest, VadChunk, VadFeedResult, VadItem
from speech_serve.settings import DEFAULT_DEPLOYMENT_OPTIONS, AppSettings, RetrySettings
from tests.support.fakes import ManualClock, PendingResponse


async def _answered_as_cancelled(wait):
    """`wait(future)` in a task whose cancel lands in the tick its answer does (a VAD lane answers
    all its sessions at once): what the task ends with."""
    answer = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait(answer))
    await asyncio.sleep(0)  # the task waits on the answer
    answer.set_result("answer")
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


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


def test_first_retry_is_immediate_then_backoff_doubles_up_to_the_cap():
    now = ManualClock()
    clock = RetryClock(RetrySettings(deadline_s=1000, backoff_s=0.5, max_backoff_s=3), now)
    waits = [clock.failed() for _ in range(6)]
    assert waits == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert clock.retries == 6


def test_the_deadline_counts_from_the_first_failure_and_bounds_every_wait_and_try():
    now = ManualClock()
    clock = RetryClock(RetrySettings(deadline_s=10, backoff_s=4, max_backoff_s=8), now)
    now.now += 500  # a slow first try (queued under load) does not eat the budget
    assert clock.failed() == 0.0
    assert clock.remaining_s() == 10
    now.now += 7  # the retry waited 7 s in the router for a replacement, then failed again
    assert clock.remaining_s() == 3
    assert clock.failed() == 3  # the 4 s backoff is cut to what is left
    now.now += 3
    assert clock.remaining_s() == 0
    assert clock.failed() is None  # budget spent: give up


def test_default_budget_outlasts_a_replica_restart():
    """Measured here: Serve notices a dead replica within health_check_period_s (2 s) and a
    replacement with test models runs about 10 s later; full models take longer to load."""
    s = RetrySettings()
    assert s.deadline_s >= 30 and s.max_backoff_s < s.deadline_s


def test_shipped_config_sets_the_retry_budget_and_fast_health_checks():
    with open("config/serve.yaml") as f:
        (app,) = yaml.safe_load(f)["applications"]
    settings = AppSettings(**app["args"])
    assert settings.retry == RetrySettings(**app["args"].get("retry", {}))
    assert settings.asr.dither == 0.0
    options = {name: {**DEFAULT_DEPLOYMENT_OPTIONS[name], **next((d for d in app["deployments"] if d["name"] == name),
                                                                  {})} for name in DEFAULT_DEPLOYMENT_OPTIONS}
    periods = {name: o.get("health_check_period_s") for name, o in options.items()}
    assert all(periods[name] is not None and periods[name] <= 5 for name in ("VADHost", "SenseVoice", "Speaker"))


@pytest.mark.parametrize("bad", [{"deadline_s": "soon"}, {"retries": 3}])
def test_bad_retry_settings_are_refused(bad):
    with pytest.raises(ValueError):
        AppSettings(retry=bad)


def test_every_try_is_bounded_the_first_one_too():
    now = ManualClock()
    clock = RetryClock(RetrySettings(deadline_s=60, try_timeout_s=20), now)
    assert clock.remaining_s() == 20  # a wedged replica cannot hold a first try for ever
    assert clock.failed() == 0.0
    assert clock.remaining_s() == 20  # after a failure: the smaller of the try bound and the budget left
    now.now += 50
    assert clock.remaining_s() == 10


def test_a_wedged_model_replica_fails_the_call_after_try_timeout_s_and_the_request_is_cancelled():
    """Before, a first try had no bound: one utterance on a wedged SenseVoice held the session's
    in-order results and finish() for ever. Now it fails (recognition_failed) and the rest go on."""
    sent: list[PendingResponse] = []

    async def scenario():
        asr = SimpleNamespace(transcribe=SimpleNamespace(remote=lambda request: PendingResponse(sent)))
        calls = ModelCalls(None, asr, None, AppSettings(retry={"try_timeout_s": 0.05}))
        with pytest.raises(ReplicaLostError, match="try_timeout_s"):
            await asyncio.wait_for(calls.transcribe(AsrRequest(np.zeros(1600, np.int16)), "s1"), 5)

    asyncio.run(scenario())
    assert len(sent) == 1 and sent[0].cancelled  # not retried (it would queue again); dropped on the replica


def test_a_wedged_vad_call_frees_its_lane_for_the_next_call():
    """A lane makes one VADHost call at a time: a call that never returned blocked every session of
    the lane for ever. Now the call fails after try_timeout_s (its sessions close with `internal`)
    and the lane's next call goes out. Both sessions share the one lane."""
    sent: list = []

    def feed_many(lane, items):
        if not sent:
            return PendingResponse(sent)
        sent.append(items)

        async def answer():
            return [VadFeedResult(events=[]) for _ in items]

        return answer()

    async def scenario():
        vad = SimpleNamespace(feed_many=SimpleNamespace(remote=feed_many))
        calls = ModelCalls(vad, None, None, AppSettings(retry={"try_timeout_s": 0.05},
                                                          stream={"vad_batch_interval_ms": 0}))  # fmt: skip
        chunk = VadChunk(np.zeros(3200, np.int16), 0)
        with pytest.raises(ReplicaLostError):
            await asyncio.wait_for(calls.feed_vad("a", Timeline(200, 30_000), chunk), 5)
        result, _ = await asyncio.wait_for(calls.feed_vad("b", Timeline(200, 30_000), chunk), 5)
        return result

    assert asyncio.run(scenario()).events == []
    assert sent[0].cancelled and [item.session_id for item in sent[1]] == ["b"]


def test_a_cancel_that_lands_with_the_answer_is_not_swallowed():
    """Python 3.11's wait_for returned the answer and dropped the cancel, so a closed session's
    feeder went on feeding; every Serve call of the Ingress is bounded through `bounded`."""
    assert asyncio.run(_answered_as_cancelled(lambda f: bounded(f, 5))) == "cancelled"


def test_a_try_cancelled_as_its_answer_lands_ends_cancelled():
    async def wait(answer):
        asr = SimpleNamespace(transcribe=SimpleNamespace(remote=lambda request: answer))
        calls = ModelCalls(None, asr, None, AppSettings(retry={"try_timeout_s": 5}))
        return await calls.transcribe(AsrRequest(np.zeros(1600, np.int16)), "s1")

    assert asyncio.run(_answered_as_cancelled(wait)) == "cancelled"


def test_cleanup_after_an_earlier_cancel_still_gets_its_answer():
    """Only a cancel asked for during the wait counts: a `finally` of a cancelled task (a slot's
    release, say) still gets what its call returns."""

    async def scenario():
        async def cancelled_then_cleans_up():
            try:
                await asyncio.sleep(10)
            finally:
                return await bounded(asyncio.sleep(0.01, result="released"), 5)  # noqa: B012

        task = asyncio.create_task(cancelled_then_cleans_up())
        await asyncio.sleep(0)
        task.cancel()
        return await task

    assert asyncio.run(scenario()) == "released"


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


@pytest.mark.parametrize("failures, outcome", [(1, "replayed"), (2, "VadItemError")])
def test_a_chunk_the_vadhost_failed_is_replayed_fresh_once_not_closed(failures, outcome):
    """The replica drops a session's state when its step fails, as when the replica is lost: the
    design is a replay, but the session was closed with 1011 at the first failed item."""
    fed: list[VadChunk] = []

    async def feed_many(lane, items):
        fed.extend(item.chunk for item in items)
        return [VadFeedResult(events=[], error="boom" if len(fed) <= failures else None) for _ in items]

    async def scenario():
        calls = ModelCalls(SimpleNamespace(feed_many=SimpleNamespace(remote=feed_many)), None, None,
                           AppSettings(stream={"vad_batch_interval_ms": 0}))  # fmt: skip
        timeline = Timeline(200, 30_000)
        timeline.add_audio(np.zeros(3200, dtype=np.int16))
        try:
            _, replays = await calls.feed_vad("a", timeline, VadChunk(np.zeros(3200, dtype=np.int16), 0))
            return "replayed" if replays == 1 else replays
        except VadItemError:
            return "VadItemError"

    assert asyncio.run(scenario()) == outcome
    assert fed[1].restart and fed[1].start_ms == 0 and len(fed) == 2  # the unfinished audio, from a fresh state

"""The retry clock for calls whose replica was lost (the integration tests kill real replicas), and
the bound on every try (a replica that takes a call and never answers)."""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from speech_serve.ingress.recognition import (
    ModelCalls,
    RecognitionOptions,
    ReplicaLostError,
    RetryClock,
    Timeline,
    bounded,
)
from speech_serve.messages import VadChunk, VadFeedResult
from speech_serve.settings import AppSettings, RetrySettings


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_first_retry_is_immediate_then_backoff_doubles_up_to_the_cap():
    now = FakeTime()
    clock = RetryClock(RetrySettings(deadline_s=1000, backoff_s=0.5, max_backoff_s=3), now)
    waits = [clock.failed() for _ in range(6)]
    assert waits == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert clock.retries == 6


def test_the_deadline_counts_from_the_first_failure_and_bounds_every_wait_and_try():
    now = FakeTime()
    clock = RetryClock(RetrySettings(deadline_s=10, backoff_s=4, max_backoff_s=8), now)
    now.t += 500  # a slow first try (queued under load) does not eat the budget
    assert clock.failed() == 0.0
    assert clock.remaining_s() == 10
    now.t += 7  # the retry waited 7 s in the router for a replacement, then failed again
    assert clock.remaining_s() == 3
    assert clock.failed() == 3  # the 4 s backoff is cut to what is left
    now.t += 3
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
    assert settings.retry == RetrySettings(**app["args"]["retry"])
    assert settings.asr.dither == 0.0
    periods = {d["name"]: d.get("health_check_period_s") for d in app["deployments"]}
    assert all(periods[name] is not None and periods[name] <= 5 for name in ("VADHost", "SenseVoice", "Speaker"))


@pytest.mark.parametrize("bad", [{"deadline_s": "soon"}, {"retries": 3}])
def test_bad_retry_settings_are_refused(bad):
    with pytest.raises(ValueError):
        AppSettings(retry=bad)


def test_every_try_is_bounded_the_first_one_too():
    now = FakeTime()
    clock = RetryClock(RetrySettings(deadline_s=60, try_timeout_s=20), now)
    assert clock.remaining_s() == 20  # a wedged replica cannot hold a first try for ever
    assert clock.failed() == 0.0
    assert clock.remaining_s() == 20  # after a failure: the smaller of the try bound and the budget left
    now.t += 50
    assert clock.remaining_s() == 10


class Wedged:
    """A Serve response from a replica that took the call and never answers; records the cancel."""

    def __init__(self, log: list):
        self.future = asyncio.get_running_loop().create_future()
        self.cancelled = False
        log.append(self)

    def __await__(self):
        return self.future.__await__()

    def cancel(self) -> None:
        self.cancelled = True


def test_a_wedged_model_replica_fails_the_call_after_try_timeout_s_and_the_request_is_cancelled():
    """Before, a first try had no bound: one utterance on a wedged SenseVoice held the session's
    in-order results and finish() for ever. Now it fails (recognition_failed) and the rest go on."""
    sent: list[Wedged] = []

    async def scenario():
        asr = SimpleNamespace(transcribe=SimpleNamespace(remote=lambda request: Wedged(sent)))
        calls = ModelCalls(None, asr, None, RetrySettings(try_timeout_s=0.05), "test")
        with pytest.raises(ReplicaLostError, match="try_timeout_s"):
            await asyncio.wait_for(calls.transcribe(np.zeros(1600, np.int16), RecognitionOptions(), "s1"), 5)

    asyncio.run(scenario())
    assert len(sent) == 1 and sent[0].cancelled  # not retried (it would queue again); dropped on the replica


def test_a_wedged_vad_call_frees_its_lane_for_the_next_call():
    """A lane makes one VADHost call at a time: a call that never returned blocked every session of
    the lane for ever. Now the call fails after try_timeout_s (its sessions close with `internal`)
    and the lane's next call goes out. Both sessions share the one lane."""
    sent: list = []

    def feed_many(lane, items):
        if not sent:
            return Wedged(sent)
        sent.append(items)

        async def answer():
            return [VadFeedResult(events=[]) for _ in items]

        return answer()

    async def scenario():
        vad = SimpleNamespace(feed_many=SimpleNamespace(remote=feed_many))
        calls = ModelCalls(vad, None, None, RetrySettings(try_timeout_s=0.05), "test", vad_batch_interval_ms=0)
        chunk = VadChunk(np.zeros(3200, np.int16), 0)
        with pytest.raises(ReplicaLostError):
            await asyncio.wait_for(calls.feed_vad("a", Timeline(200, 30_000), chunk), 5)
        result, _ = await asyncio.wait_for(calls.feed_vad("b", Timeline(200, 30_000), chunk), 5)
        return result

    assert asyncio.run(scenario()).events == []
    assert sent[0].cancelled and [item.session_id for item in sent[1]] == ["b"]


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


def test_a_cancel_that_lands_with_the_answer_is_not_swallowed():
    """Python 3.11's wait_for returned the answer and dropped the cancel, so a closed session's
    feeder went on feeding; every Serve call of the Ingress is bounded through `bounded`."""
    assert asyncio.run(_answered_as_cancelled(lambda f: bounded(f, 5))) == "cancelled"


def test_a_try_cancelled_as_its_answer_lands_ends_cancelled():
    async def wait(answer):
        asr = SimpleNamespace(transcribe=SimpleNamespace(remote=lambda request: answer))
        calls = ModelCalls(None, asr, None, RetrySettings(try_timeout_s=5), "test")
        return await calls.transcribe(np.zeros(1600, np.int16), RecognitionOptions(), "s1")

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

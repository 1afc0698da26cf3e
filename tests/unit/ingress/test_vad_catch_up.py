"""A session whose VAD calls are slower than its audio catches up: what came while a call was
out goes in the next call as one chunk, `push` does not wait for the VAD (until it is
`max_vad_lag_ms` behind), and the utterances come out exactly as with one call per chunk."""

from __future__ import annotations

import asyncio

import numpy as np

from speech_serve.ingress.recognition import RecognitionOptions, Timeline, UtteranceStream
from speech_serve.messages import VadEvent, VadFeedResult, samples_to_ms
from tests.unit.ingress.test_input_limits import SlowModels

SPEECH = [(1000, 2000), (3400, 4200)]  # ms of the stream where the fake VAD hears speech


class SlowVad(SlowModels):
    """A VAD that takes `call_s` per call and reports SPEECH's edges as their audio arrives; the
    recognitions answer at once."""

    def __init__(self, call_s: float):
        super().__init__()
        self.release.set()
        self.call_s = call_s
        self.chunks: list[tuple[int, int]] = []  # (start_ms, length ms) of each call

    async def feed_vad(self, sid, timeline, chunk):
        await asyncio.sleep(self.call_s)
        start, end = chunk.start_ms, chunk.start_ms + samples_to_ms(len(chunk.pcm))
        self.chunks.append((start, end - start))
        events = [VadEvent(kind, at) for s, e in SPEECH for kind, at in (("start", s), ("end", e)) if start <= at < end]
        return VadFeedResult(events=events), 0


def run(call_s: float, max_vad_lag_ms: int, frames: int = 100, frame_ms: int = 60):
    async def scenario():
        vad, answered, waits = SlowVad(call_s), [], []
        metrics = type("M", (), {"vad_call": lambda self, ms: None})()

        async def on_result(result):
            answered.append((result.index, result.start_ms, result.end_ms))

        stream = UtteranceStream("s1", Timeline(200, 30_000), vad, metrics, RecognitionOptions(), on_result,
                                 on_result, max_vad_lag_ms=max_vad_lag_ms)  # fmt: skip
        for _ in range(frames):  # all at once: a session whose frames queued while the host was busy
            started = asyncio.get_running_loop().time()
            await stream.push(np.ones(16 * frame_ms, dtype=np.int16))
            waits.append(asyncio.get_running_loop().time() - started)
        await asyncio.wait_for(stream.finish(), 10)
        return vad.chunks, answered, waits

    return asyncio.run(scenario())


def test_a_slow_vad_gets_what_came_meanwhile_in_one_call():
    chunks, answered, waits = run(call_s=0.05, max_vad_lag_ms=10_000)
    assert len(chunks) <= 3  # 6 s of audio queued at once: one call (and the final flush), not 30
    assert [s for s, _ in chunks] == [0, *np.cumsum([n for _, n in chunks])[:-1]]  # contiguous, in order
    assert sum(n for _, n in chunks) == 6000  # every ms fed once
    assert max(waits) < 0.04  # push never waited for a call
    assert [(i, s, e) for i, s, e in answered] == [(0, *SPEECH[0]), (1, *SPEECH[1])]


def test_the_same_utterances_as_one_call_per_chunk():
    merged = run(call_s=0.01, max_vad_lag_ms=10_000)
    one_by_one = run(call_s=0.01, max_vad_lag_ms=0)  # every push waits: one call per 200 ms chunk
    assert merged[1] == one_by_one[1] == [(0, *SPEECH[0]), (1, *SPEECH[1])]
    assert {n for _, n in one_by_one[0][:-1]} == {200} and len(one_by_one[0]) == 30 + 1  # and the final flush


def test_push_waits_once_the_vad_is_too_far_behind():
    chunks, _, waits = run(call_s=0.2, max_vad_lag_ms=1000, frames=50)
    assert sum(1 for w in waits if w > 0.1) >= 2  # it waited for the VAD now and then
    assert all(n <= 1000 + 200 for _, n in chunks)  # no call carries much more than the lag allowed
    assert sum(n for _, n in chunks) == 3000


class StubbornVad(SlowVad):
    """A VAD call that finishes as the stream closes: Python 3.11's `asyncio.wait_for` then
    returns the result and swallows the cancellation (the feeder goes on as if never cancelled).
    Records every feed and the close, in the order the VADHost would see them."""

    def __init__(self):
        super().__init__(call_s=0.05)
        self.calls: list[str] = []

    async def feed_vad(self, sid, timeline, chunk):
        try:
            await asyncio.sleep(self.call_s)
        except asyncio.CancelledError:
            pass  # the answer was already there: wait_for returns it
        self.calls.append("feed")
        start = chunk.start_ms
        return VadFeedResult(events=[VadEvent("start", start), VadEvent("end", start + 100)]), 0  # an utterance

    async def recognise(self, sid, utt, options):
        self.calls.append("recognise")
        return await super().recognise(sid, utt, options)

    def close_vad_later(self, sid, after=None):
        async def close():
            if after is not None:
                await asyncio.wait([after])
            self.calls.append("close")

        self.closing = asyncio.create_task(close())


def test_no_vad_call_follows_the_close_even_if_the_feeder_missed_its_cancel():
    """The client left while a VAD call was out. A feed after the close would find no state,
    replay from a fresh one and leave it on the VADHost for `session_idle_s` (seen in CI as one
    `vad_sessions` left after the churn test); an utterance that call ended is for nobody."""

    async def scenario():
        vad = StubbornVad()
        metrics = type("M", (), {"vad_call": lambda self, ms: None})()
        stream = UtteranceStream("s1", Timeline(200, 30_000), vad, metrics, RecognitionOptions(),
                                 None, None, max_vad_lag_ms=10_000)  # fmt: skip
        await stream.push(np.ones(16 * 200, dtype=np.int16))  # one chunk: the feeder's call goes out
        await asyncio.sleep(0)
        await stream.push(np.ones(16 * 400, dtype=np.int16))  # two more wait for that call
        stream.close()
        await asyncio.wait_for(vad.closing, 5)
        await asyncio.sleep(0.2)  # anything the feeder would still send
        return vad.calls

    calls = asyncio.run(scenario())
    assert calls == ["feed", "close"]  # the call that was out; nothing recognised, nothing fed after

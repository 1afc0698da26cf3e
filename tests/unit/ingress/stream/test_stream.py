"""The utterance stream (stream/stream.py): recognition with its speaker policy, tasks that end
with the stream, utterances in flight capped, and a VAD that catches up after a slow call."""

from __future__ import annotations

import asyncio
import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest

from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.protocols.plain import render_result
from speech_serve.ingress.stream.calls import Backlog, ModelCalls
from speech_serve.ingress.stream.stream import (
    Recognition,
    RecognitionOptions,
    UtteranceStream,
    UtteranceStreams,
    live_stream_tasks,
)
from speech_serve.ingress.stream.timeline import Timeline
from speech_serve.messages import (
    SpeakerEmbedding,
    Transcript,
    Utterance,
    VadEvent,
    VadFeedResult,
)
from speech_serve.settings import AppSettings
from speech_serve.wire.pcm import SAMPLES_PER_MS
from tests.support.fakes import ManualClock, SlowModels

TEXT = Transcript("turn on the light", "en", "neutral", "Speech", "<|en|>turn on the light")


def utterance(ms: int = 1000) -> Utterance:
    return Utterance(0, 0, ms, np.full(ms * 16, 500, dtype=np.int16))


def remote(answer, log: list | None = None):
    async def call(request):
        if log is not None:
            log.append(request)
        if isinstance(answer, BaseException):
            raise answer
        if answer == "never":
            await asyncio.Event().wait()
        return answer

    return SimpleNamespace(remote=call)


def recognise(asr_answer, speaker_answer, utt: Utterance | None = None, speaker_log: list | None = None,
              speaker_min_ms: int = 0, shed=None):  # fmt: skip
    """One utterance through `Recognition` with these answers from SenseVoice and the Speaker;
    `shed(what)` stands in for the backlog's decision."""

    async def scenario():
        asr = SimpleNamespace(transcribe=remote(asr_answer))
        speaker = SimpleNamespace(embed=remote(speaker_answer, speaker_log))
        settings = AppSettings(retry={"try_timeout_s": 0.05}, speaker={"min_utterance_ms": speaker_min_ms})
        backlog = None if shed is None else SimpleNamespace(shed=shed, waiting=contextlib.nullcontext)
        recognition = Recognition(ModelCalls(None, asr, speaker, settings, backlog), settings, "test")
        return await asyncio.wait_for(recognition("s1", utt or utterance(), RecognitionOptions()), 5)

    return asyncio.run(scenario())


def good_embedding() -> SpeakerEmbedding:
    return SpeakerEmbedding(np.ones(192, np.float32), "eres2netv2", label="alice", score=0.9, speaker_id="spk1")


async def _noop(*_args) -> None:
    return None


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
        start, end = chunk.start_ms, chunk.start_ms + len(chunk.pcm) // SAMPLES_PER_MS
        self.chunks.append((start, end - start))
        events = [VadEvent(kind, at) for s, e in SPEECH for kind, at in (("start", s), ("end", e)) if start <= at < end]
        return VadFeedResult(events=events), 0


def run(call_s: float, max_vad_lag_ms: int, frames: int = 100, frame_ms: int = 60):
    async def scenario():
        vad, answered, waits = SlowVad(call_s), [], []
        metrics = type("M", (), {"vad_call": lambda self, ms: None})()

        async def on_result(result):
            answered.append((result.index, result.start_ms, result.end_ms))

        stream = UtteranceStream("s1", Timeline(200, 30_000), vad, vad.recognise, metrics, RecognitionOptions(),
                                 on_result, on_result, settings=AppSettings(stream={"vad_max_lag_ms": max_vad_lag_ms}))
        for _ in range(frames):  # all at once: a session whose frames queued while the host was busy
            started = asyncio.get_running_loop().time()
            await stream.push(np.ones(16 * frame_ms, dtype=np.int16))
            waits.append(asyncio.get_running_loop().time() - started)
        await asyncio.wait_for(stream.finish(), 10)
        return vad.chunks, answered, waits

    return asyncio.run(scenario())


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


def flood_a_capped_stream(feed, **stream) -> tuple[bool, int, list[int]]:
    """`feed(stream)` against recognitions that hang until released, 3 in flight at most: whether it
    was held back, the most recognitions in flight at once, and the results' indexes in order."""

    async def scenario():
        models = SlowModels()
        answered = []

        async def on_result(result):
            answered.append(result.index)

        metrics = type("M", (), {"vad_call": lambda self, ms: None})()
        settings = AppSettings(stream={"max_utterances_in_flight": 3, **stream})
        capped = UtteranceStream("s1", Timeline(200, 30_000), models, models.recognise, metrics, RecognitionOptions(),
                                 on_result, on_result, settings=settings)  # fmt: skip
        feeding = asyncio.create_task(feed(capped))
        for _ in range(50):
            await asyncio.sleep(0.01)
        blocked = not feeding.done()
        models.release.set()
        await asyncio.wait_for(feeding, 5)
        await asyncio.wait_for(capped.finish(), 5)
        return blocked, models.most, answered

    return asyncio.run(scenario())


def test_utterances_in_flight_per_session_are_capped():
    """Audio that finishes utterances faster than they are recognised waits for room (its
    frames wait, and past max_queued_bytes the session is closed): no unbounded fan-out."""

    async def push_frames(stream):  # 20 frames of 200 ms, each ending an utterance (one frame of 4 s would
        for _ in range(20):  # have its chunks' events land behind the trimmed buffer: empty utterances)
            await stream.push(np.zeros(3200, dtype=np.int16))

    # max_vad_lag_ms 0: every push waits for its chunk's VAD call, so each 200 ms frame is one call
    blocked, most, answered = flood_a_capped_stream(push_frames, vad_max_lag_ms=0)
    assert blocked and most == 3
    assert answered == list(range(len(answered))) and len(answered) >= 20


def test_manual_turns_are_capped_in_flight_too():
    """A Realtime client with turn_detection null (append 100 ms, commit, ten times a second) or a
    Xiaozhi device in listen manual never reaches the VAD feeder's room check: end_utterance must wait
    for room itself, or one client keeps hundreds of SenseVoice calls in flight."""

    async def turns(stream):
        for _ in range(20):
            await stream.begin_utterance()
            await stream.push(np.full(1600, 500, dtype=np.int16))  # 100 ms of audio
            await stream.end_utterance()

    blocked, most, answered = flood_a_capped_stream(turns)
    assert blocked and most == 3
    assert answered == list(range(20))


def test_the_text_goes_out_with_speaker_unknown_when_the_speaker_call_fails():
    result, embedding = recognise(TEXT, RuntimeError("database is locked"))
    assert result.text == "turn on the light" and embedding is None
    assert (result.speaker.label, result.speaker.score, result.speaker.reason) == ("unknown", None, "speaker_failed")
    frame = json.loads(render_result(result))
    assert frame["speaker"]["label"] == "unknown" and frame["speaker"]["reason"] == "speaker_failed"
    assert "speaker" not in result.batch_sizes


def test_a_speaker_that_never_answers_does_not_hold_the_text():
    result, _ = recognise(TEXT, "never")
    assert result.text == "turn on the light" and result.speaker.reason == "speaker_failed"


def test_with_the_default_retry_bounds_a_hung_speaker_holds_the_text_only_its_budget():
    """With the defaults a Speaker call retries for retry.deadline_s (60 s): an outage held every
    transcript that long. The text now goes out speaker.budget_ms after it is in."""

    async def scenario():
        asr = SimpleNamespace(transcribe=remote(TEXT))
        calls = []
        speaker = SimpleNamespace(embed=remote("never", calls))
        settings = AppSettings(speaker={"min_utterance_ms": 0})  # retry bounds as shipped
        recognition = Recognition(ModelCalls(None, asr, speaker, settings), settings, "test")
        return await asyncio.wait_for(recognition("s1", utterance(), RecognitionOptions()), 5), calls

    (result, _), calls = asyncio.run(scenario())
    assert calls and result.text == "turn on the light" and result.speaker.reason == "speaker_late"


def test_an_uploads_segment_waiting_on_sensevoice_is_not_in_the_backlog():
    """The backlog's queue delay sheds interims and the speaker and refuses devices: one long upload
    (or one slow segment of it) must not do that to every session."""
    clock = ManualClock()

    async def scenario():
        asr = SimpleNamespace(transcribe=remote("never"))
        settings = AppSettings(speaker={"enabled": False}, retry={"try_timeout_s": 60},
                               admission={"shed_interims_delay_s": 0.5, "shed_speaker_delay_s": 1.0,
                                          "max_queue_delay_s": 2.0})  # fmt: skip
        calls = ModelCalls(None, asr, None, settings, Backlog(settings.admission, clock=clock))
        recognition = Recognition(calls, settings, "test")
        upload = asyncio.create_task(recognition("file-1", utterance(), RecognitionOptions(), live=False))
        stream = asyncio.create_task(recognition("s1", utterance(), RecognitionOptions()))
        await asyncio.sleep(0.05)
        clock.now += 10
        upload_only = calls.backlog.queue_delay_s()
        stream.cancel()
        await asyncio.gather(stream, return_exceptions=True)
        delays = (upload_only, calls.backlog.queue_delay_s())
        upload.cancel()
        await asyncio.gather(upload, return_exceptions=True)
        return delays

    with_stream, upload_alone = asyncio.run(scenario())
    assert with_stream == 10 and upload_alone == 0  # only the stream's final counts


def test_a_failing_speaker_is_not_asked_for_a_while_then_tried_again():
    """Three failed or late Speaker calls in a row open the breaker: the next utterances are not sent
    to it (speaker_unavailable) until breaker_open_s has passed; then one is tried again."""
    clock = ManualClock()

    async def scenario():
        asr = SimpleNamespace(transcribe=remote(TEXT))
        calls = []
        speaker = SimpleNamespace(embed=remote(RuntimeError("speaker down"), calls))
        settings = AppSettings(retry={"try_timeout_s": 0.05}, speaker={"min_utterance_ms": 0, "breaker_open_s": 10})
        recognition = Recognition(ModelCalls(None, asr, speaker, settings), settings, "test", clock=clock)
        reasons = []
        for step in range(6):
            if step == 5:
                clock.now += 11  # the breaker's time is up
            result, _ = await asyncio.wait_for(recognition("s1", utterance(), RecognitionOptions()), 5)
            reasons.append(result.speaker.reason)
        return reasons, calls

    reasons, calls = asyncio.run(scenario())
    assert reasons == ["speaker_failed"] * 3 + ["speaker_unavailable"] * 2 + ["speaker_failed"]
    assert len(calls) == 4  # not asked while the breaker was open


@pytest.mark.parametrize("vector", [np.zeros(192, np.float32), np.full(192, np.nan, np.float32)])
def test_a_zero_or_nan_embedding_is_unknown_and_not_kept_for_enrolment(vector):
    result, embedding = recognise(TEXT, SpeakerEmbedding(vector, "eres2netv2"))
    assert embedding is None  # the stream keeps only usable embeddings (enrol-from-session)
    assert (result.speaker.label, result.speaker.reason) == ("unknown", "no_embedding")
    assert "NaN" not in render_result(result)


def test_a_clip_too_short_for_the_speaker_model_is_not_sent_to_it():
    """ERes2NetV2 gives NaN under about 105 ms (measured): such a clip would fail its batch."""
    sent: list = []
    result, _ = recognise(TEXT, good_embedding(), utterance(80), sent, speaker_min_ms=150)
    assert sent == [] and result.text == "turn on the light" and result.speaker.reason == "too_short"


def test_an_asr_failure_still_fails_the_utterance():
    with pytest.raises(RuntimeError, match="fbank"):
        recognise(RuntimeError("fbank"), good_embedding())


def test_a_good_answer_has_no_reason():
    result, embedding = recognise(TEXT, good_embedding())
    assert (result.speaker.label, result.speaker.reason, embedding.label) == ("alice", None, "alice")
    assert "reason" not in json.loads(render_result(result))["speaker"]


def test_under_load_the_speaker_model_is_shed_and_the_result_says_so():
    calls = []
    result, embedding = recognise(TEXT, good_embedding(), speaker_log=calls, shed=lambda what: what == "speaker")
    assert result.text == "turn on the light" and embedding is None and calls == []  # never asked
    frame = json.loads(render_result(result))
    assert frame["speaker"] == {"label": "unknown", "score": None, "speaker_id": None, "embedding_id": None,
                                "reason": "shed"}  # fmt: skip


def test_stream_tasks_are_counted_while_it_lives_and_gone_after_close():
    async def scenario() -> list[int]:
        # No deployments behind it: closing only tries to free VAD state, and that failure is
        # logged and ignored as for a VAD replica that is already gone.
        settings = AppSettings()
        models = ModelCalls(None, None, None, settings)
        streams = UtteranceStreams(models, settings, IngressMetrics(), "test")
        counts = [live_stream_tasks()]
        runners = [streams.open(f"s{i}", RecognitionOptions(), _noop, _noop) for i in range(3)]
        await asyncio.sleep(0)
        counts.append(live_stream_tasks())
        for runner in runners:
            runner.close()
        await asyncio.sleep(0)
        counts.append(live_stream_tasks())
        return counts

    assert asyncio.run(scenario()) == [0, 3, 0]


def test_a_call_whose_model_replica_died_is_retried_and_counted():
    """The integration test kills replicas, but whether a kill catches a request in flight is a
    race: here the Speaker's first answer is a dead replica, every time."""
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError

    answers = [ActorDiedError(), "embedding"]

    async def remote(request):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def scenario():
        speaker = SimpleNamespace(embed=SimpleNamespace(remote=remote))
        calls = ModelCalls(None, None, speaker, AppSettings(retry={"backoff_s": 0.01}))
        embedding, _, retries = await calls.embed(np.zeros(1600, dtype=np.int16), None, "s1")
        return embedding, retries

    assert asyncio.run(scenario()) == ("embedding", 1)


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


def test_no_vad_call_follows_the_close_even_if_the_feeder_missed_its_cancel():
    """The client left while a VAD call was out. A feed after the close would find no state,
    replay from a fresh one and leave it on the VADHost for `session_idle_s` (seen in CI as one
    `vad_sessions` left after the churn test); an utterance that call ended is for nobody."""

    async def scenario():
        vad = StubbornVad()
        metrics = type("M", (), {"vad_call": lambda self, ms: None})()
        stream = UtteranceStream("s1", Timeline(200, 30_000), vad, vad.recognise, metrics, RecognitionOptions(),
                                 None, None, settings=AppSettings(stream={"vad_max_lag_ms": 10_000}))  # fmt: skip
        await stream.push(np.ones(16 * 200, dtype=np.int16))  # one chunk: the feeder's call goes out
        await asyncio.sleep(0)
        await stream.push(np.ones(16 * 400, dtype=np.int16))  # two more wait for that call
        stream.close()
        await asyncio.wait_for(vad.closing, 5)
        await asyncio.sleep(0.2)  # anything the feeder would still send
        return vad.calls

    calls = asyncio.run(scenario())
    assert calls == ["feed", "close"]  # the call that was out; nothing recognised, nothing fed after

"""What one WebSocket client may send, bounded in the shared connection loop for every protocol:
frames per second, audio per second (1.5x real time over a window), text-frame size, string
fields, frames waiting to be handled, and utterances being recognised at once; and the utterance
buffer takes tiny frames in linear time. No Ray: in-memory WebSockets and fake model calls."""

from __future__ import annotations

import asyncio
import json
import tracemalloc

import numpy as np
import pytest

from speech_serve.ingress.connection import ProtocolError
from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.protocols import funasr, plain, xiaozhi
from speech_serve.ingress.protocols.funasr import FunasrConnection
from speech_serve.ingress.protocols.plain import PlainConnection
from speech_serve.ingress.recognition import (
    ModelCalls,
    RecognitionOptions,
    Timeline,
    UtteranceStream,
    UtteranceStreams,
)
from speech_serve.messages import CLOSE_POLICY, CLOSE_TOO_BIG, SpeakerInfo, UtteranceResult, VadEvent, VadFeedResult
from speech_serve.settings import AppSettings
from tests.unit.ingress.test_sessions import HungVad, MemoryWebSocket


# ---- the utterance buffer --------------------------------------------------------------------------
def test_tiny_frames_cost_the_timeline_linear_work():
    """Before: each frame copied the whole utterance buffer (quadratic: 3 s in 16-sample frames
    allocated 144 MB). Now the bytes allocated while taking a frame do not grow with the buffer."""
    timeline = Timeline(vad_chunk_ms=200, max_utterance_ms=30_000)
    frame = np.ones(16, dtype=np.int16)
    frames = 3 * 16_000 // 16
    allocated = 0
    tracemalloc.start()
    try:
        for _ in range(frames):
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            timeline.add_audio(frame)  # no VAD events: the utterance buffer keeps everything
            _, peak = tracemalloc.get_traced_memory()
            allocated += peak - before
    finally:
        tracemalloc.stop()
    total = frames * frame.nbytes
    assert timeline.buffered_ms == 3000
    assert allocated < 8 * total + 1_000_000, (allocated, total)


def test_the_timeline_hands_out_the_same_audio_as_before():
    """Chunks, replays and cut utterances carry exactly the samples pushed, whatever the frame sizes."""
    rng = np.random.default_rng(1)
    audio = rng.integers(-30000, 30000, 16_000 * 4, dtype=np.int16)
    timeline = Timeline(vad_chunk_ms=200, max_utterance_ms=30_000, idle_keep_ms=0)
    chunks, at = [], 0
    while at < len(audio):
        n = int(rng.integers(1, 5000))
        chunks += timeline.add_audio(audio[at : at + n])
        at += n
    assert np.array_equal(np.concatenate([c.pcm for c in chunks]), audio[: len(chunks) * 3200])
    assert np.array_equal(timeline.replay_chunk().pcm, audio[: len(chunks) * 3200])
    (utt,) = timeline.on_vad_events([VadEvent("start", 500), VadEvent("end", 2500)])
    assert np.array_equal(utt.pcm, audio[8000:40000])
    timeline.add_audio(audio[:100])  # later audio never changes what was handed out
    assert np.array_equal(utt.pcm, audio[8000:40000]) and np.array_equal(chunks[0].pcm, audio[:3200])


# ---- the connection loop ---------------------------------------------------------------------------
class QuietVad:
    """A VADHost that answers at once and hears no speech."""

    def __init__(self):
        self.chunks = 0

        async def remote(lane, items):
            self.chunks += len(items)
            return [VadFeedResult(events=[]) for _ in items]

        self.feed_many = type("Method", (), {"remote": staticmethod(remote)})()


def binary(data: bytes) -> dict:
    return {"type": "websocket.receive", "bytes": data}


def text(data: str) -> dict:
    return {"type": "websocket.receive", "text": data}


def connection(cls, ws, settings: AppSettings, *extra, vad=None):
    """A connection whose only deployment is `vad` (its lane calls go out at once)."""
    metrics = IngressMetrics()
    models = ModelCalls(vad, None, None, settings.retry, "test", vad_batch_interval_ms=0)
    streams = UtteranceStreams(models, settings.ingress, settings.speaker.keep_embeddings, metrics)
    return cls(ws, "s1", streams, settings.ingress, metrics, *extra)


def run_session(cls, frames: list[dict], ingress: dict, vad=None, *extra, until=None, handlers=None) -> MemoryWebSocket:
    """Send `frames` at once; wait until the session ends, or `until(sent)` holds (10 s at most: a
    hang guard), then the client leaves."""

    async def scenario():
        ws = MemoryWebSocket()
        handler = connection(cls, ws, AppSettings(ingress=ingress), *extra, vad=vad or QuietVad())
        if handlers is not None:
            handlers.append(handler)
        session = asyncio.create_task(handler.run())
        for frame in frames:
            ws.inbox.put_nowait(frame)
        for _ in range(1000):
            if session.done() or (until is not None and until(ws.sent)):
                break
            await asyncio.sleep(0.01)
        if not session.done():
            ws.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
            await asyncio.wait_for(session, 10)
        return ws

    return asyncio.run(scenario())


END = text('{"type": "end"}')


def errors(ws: MemoryWebSocket) -> list[str]:
    return [m.get("code") for m in ws.sent if m.get("type") == "error" or "error" in m]


FAST = {"max_audio_rate": 1.5, "rate_window_s": 0.2}  # 0.3 s of audio ahead at most, then 1.5 s per second


def test_audio_faster_than_the_bound_is_paced_not_refused():
    """A file sent at full speed (FunASR's offline client does) is taken at 1.5x real time: the
    session holds the audio back, and every frame is still recognised."""
    quarter = binary(bytes(8_000))  # 0.25 s of 16 kHz PCM16
    handlers = []
    ws = run_session(PlainConnection, [quarter] * 6 + [END], FAST, handlers=handlers)
    assert errors(ws) == [] and ws.sent[-1]["type"] == "done" and ws.closed[0] == 1000
    # 1.5 s of audio, 0.3 s of burst: the rest waited (1.5 - 0.3) / 1.5 = 0.8 s
    assert handlers[0].intake.paced_s == pytest.approx(0.8, abs=0.05)


def test_audio_within_the_window_is_taken_at_once():
    """A short file sent as fast as the socket allows, or a live client catching up after a stall."""
    handlers = []
    ws = run_session(PlainConnection, [binary(bytes(4_000))] * 2 + [END], FAST, handlers=handlers)
    assert errors(ws) == [] and ws.sent[-1]["type"] == "done" and ws.closed[0] == 1000
    assert handlers[0].intake.paced_s == 0


def test_the_audio_bound_is_off_when_null():
    handlers = []
    ws = run_session(PlainConnection, [binary(bytes(32_000))] * 10 + [END], {**FAST, "max_audio_rate": None},
                     handlers=handlers)  # fmt: skip
    assert errors(ws) == [] and ws.sent[-1]["type"] == "done" and ws.closed[0] == 1000
    assert handlers[0].intake.paced_s == 0


def test_a_flood_of_tiny_binary_frames_is_closed_as_it_arrives():
    """Counted when read, not when handled: frames cannot pile up behind a busy frame loop."""
    flood = [binary(b"\x00\x00")] * 500
    ws = run_session(PlainConnection, flood, {"max_frames_per_s": 10, "rate_window_s": 2.0}, HungVad())
    assert errors(ws) == ["too_many_messages"] and ws.closed[0] == CLOSE_POLICY


def test_a_session_far_behind_stops_reading_its_socket():
    """The frame loop is stuck (a VADHost far behind) while the client keeps sending: past
    max_queued_bytes the reader stops reading (TCP backpressure on a real socket), nothing is
    refused, and the frames stay unread."""
    frames = [binary(bytes(64_000))] * 40  # 2.5 MB

    async def scenario():
        ws = MemoryWebSocket()
        # vad_max_lag_ms 0: the first frame's audio is already too far ahead of the hung VAD
        settings = AppSettings(ingress={"max_queued_bytes": 1_000_000, "max_audio_rate": None, "vad_max_lag_ms": 0})
        handler = connection(PlainConnection, ws, settings, vad=HungVad())
        session = asyncio.create_task(handler.run())
        for frame in frames:
            ws.inbox.put_nowait(frame)
        for _ in range(50):
            await asyncio.sleep(0.01)
        unread, queued = ws.inbox.qsize(), handler.intake.queued_bytes
        session.cancel()
        await asyncio.gather(session, return_exceptions=True)
        return ws, unread, queued

    ws, unread, queued = asyncio.run(scenario())
    assert errors(ws) == [] and not ws.closed
    assert 1_000_000 < queued <= 1_000_000 + 64_000  # it read one frame past the bound, then stopped
    assert unread == 40 - 1 - queued // 64_000  # one frame is in the stuck frame loop, the rest unread


def test_a_text_frame_over_the_limit_is_refused_with_1009():
    ws = run_session(PlainConnection, [text(json.dumps({"type": "start", "language": "x" * 70_000}))], {})
    assert errors(ws) == ["frame_too_large"] and ws.closed[0] == CLOSE_TOO_BIG


def test_a_long_string_field_gets_an_error_frame_and_the_session_goes_on():
    frames = [text(json.dumps({"type": "start", "speaker_group": "g" * 5000})), END]
    ws = run_session(PlainConnection, frames, {})
    assert errors(ws) == ["field_too_long"] and "speaker_group" in ws.sent[1]["message"]
    assert ws.sent[-1]["type"] == "done"


def test_funasr_wav_name_is_bounded_before_it_is_echoed():
    frames = [text(json.dumps({"mode": "offline", "wav_name": "w" * 5000})), text('{"is_speaking": false}')]
    ws = run_session(FunasrConnection, frames, {}, None, 600, until=lambda sent: any(m.get("is_end") for m in sent))
    assert errors(ws) == ["field_too_long"]
    assert all(len(m.get("wav_name", "")) <= 1024 for m in ws.sent)


@pytest.mark.parametrize(
    "parse, frame",
    [
        (plain.parse_text, {"type": "start", "language": "l" * 2000}),
        (lambda t, **kw: funasr.parse_text(t, False, **kw), {"mode": "2pass", "hotwords": "h" * 2000}),
        (xiaozhi.parse_text, {"type": "listen", "state": "detect", "text": "t" * 2000}),
        (xiaozhi.parse_text, {"type": "abort", "reason": "r" * 2000}),
    ],
)
def test_every_protocols_string_fields_are_bounded(parse, frame):
    with pytest.raises(ProtocolError) as err:
        parse(json.dumps(frame), max_string_chars=1024)
    assert err.value.code == "field_too_long" and "at most 1024" in str(err.value)
    parse(json.dumps(frame))  # unbounded when no limit is given (pure use, tests)


# ---- utterances in flight ----------------------------------------------------------------------------
class SlowModels:
    """ModelCalls whose VAD finds a short utterance in every chunk and whose recognitions wait."""

    def __init__(self):
        self.release = asyncio.Event()
        self.in_flight = self.most = 0

    async def feed_vad(self, sid, timeline, chunk):
        end = chunk.start_ms + 200
        return VadFeedResult(events=[VadEvent("start", chunk.start_ms), VadEvent("end", end)]), 0

    async def recognise(self, sid, utt, options):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await self.release.wait()
        self.in_flight -= 1
        result = UtteranceResult(
            session_id=sid, index=utt.index, start_ms=utt.start_ms, end_ms=utt.end_ms, text="t", language="en",
            emotion=None, event=None, raw_text="t", speaker=SpeakerInfo(), models="test",
        )  # fmt: skip
        return result, None

    def close_vad_later(self, sid, after=None):
        pass


def test_utterances_in_flight_per_session_are_capped():
    """Audio that finishes utterances faster than they are recognised waits for room (its
    frames wait, and past max_queued_bytes the session is closed): no unbounded fan-out."""

    async def scenario():
        models = SlowModels()
        answered = []

        async def on_result(result):
            answered.append(result.index)

        metrics = type("M", (), {"vad_call": lambda self, ms: None})()
        # max_vad_lag_ms 0: every push waits for its chunk's VAD call, so each 200 ms frame is one call
        stream = UtteranceStream("s1", Timeline(200, 30_000), models, metrics, RecognitionOptions(),
                                 on_result, on_result, max_in_flight=3, max_vad_lag_ms=0)  # fmt: skip

        async def push_frames():  # 20 frames of 200 ms, each ending an utterance (one frame of 4 s would
            for _ in range(20):  # have its chunks' events land behind the trimmed buffer: empty utterances)
                await stream.push(np.zeros(3200, dtype=np.int16))

        pushing = asyncio.create_task(push_frames())
        for _ in range(50):
            await asyncio.sleep(0.01)
        blocked = not pushing.done()
        models.release.set()
        await asyncio.wait_for(pushing, 5)
        await asyncio.wait_for(stream.finish(), 5)
        return blocked, models.most, answered

    blocked, most, answered = asyncio.run(scenario())
    assert blocked and most == 3
    assert answered == list(range(len(answered))) and len(answered) >= 20

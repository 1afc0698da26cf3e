"""What one WebSocket client may send (limits.py): token buckets on a hand-moved clock, and the
bounds through a real connection of each protocol over an in-memory WebSocket."""

from __future__ import annotations

import asyncio
import json

import pytest

from speech_serve.ingress.limits import TokenBucket
from speech_serve.ingress.protocols import funasr, plain, xiaozhi
from speech_serve.ingress.protocols.funasr import FunasrConnection
from speech_serve.ingress.protocols.parsing import ProtocolError
from speech_serve.ingress.protocols.plain import PlainConnection
from speech_serve.settings import AppSettings, FunasrSettings
from speech_serve.wire.codes import CLOSE_POLICY, CLOSE_TOO_BIG
from tests.support.fakes import HungVad, ManualClock, MemoryWebSocket, QuietVad, binary, connection, text


def run_session(cls, frames: list[dict], limits: dict, vad=None, *extra, until=None, handlers=None) -> MemoryWebSocket:
    """Send `frames` at once; wait until the session ends, or `until(sent)` holds (10 s at most: a
    hang guard), then the client leaves."""

    async def scenario():
        ws = MemoryWebSocket()
        settings = AppSettings(limits=limits, stream={"vad_batch_interval_ms": 0})  # lane calls go out at once
        handler = connection(cls, ws, settings, "s1", *extra, vad=vad or QuietVad())
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


def test_a_session_far_ahead_is_closed_before_its_frames_fill_the_ingress():
    """The frame loop is stuck (a VADHost far behind) while the client keeps sending. The reader
    used to stop reading past max_queued_bytes, trusting TCP to slow the client; but Ray Serve reads
    every message off the socket into a queue of its own, so the frames piled up in the Ingress
    (2 GB in 20 s from one client, measured). Past the bound the session is now closed."""
    frames = [binary(bytes(64_000))] * 40  # 2.5 MB

    async def scenario():
        ws = MemoryWebSocket()
        # vad_max_lag_ms 0: the first frame's audio is already too far ahead of the hung VAD
        settings = AppSettings(limits={"max_queued_bytes": 1_000_000, "max_audio_rate": None},
                               stream={"vad_max_lag_ms": 0, "vad_batch_interval_ms": 0})
        handler = connection(PlainConnection, ws, settings, vad=HungVad())
        session = asyncio.create_task(handler.run())
        for frame in frames:
            ws.inbox.put_nowait(frame)
        await asyncio.wait_for(session, 5)
        return ws, handler.queued.count

    ws, queued = asyncio.run(scenario())
    assert errors(ws) == ["too_far_ahead"] and ws.closed[0] == CLOSE_POLICY
    assert queued <= 1_000_000 + 64_000  # it held one frame past the bound, then closed


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
    ended = lambda sent: any(m.get("is_end") for m in sent)  # noqa: E731
    ws = run_session(FunasrConnection, frames, {}, None, FunasrSettings(), until=ended)
    assert errors(ws) == ["field_too_long"]
    assert all(len(m.get("wav_name", "")) <= 1024 for m in ws.sent)


@pytest.mark.parametrize(
    "parse, frame",
    [
        (plain.parse_text, {"type": "start", "language": "l" * 2000}),
        (lambda t, **kw: funasr.parse_text(t, False, **kw), {"mode": "2pass", "wav_name": "w" * 2000}),
        (xiaozhi.parse_text, {"type": "listen", "state": "detect", "text": "t" * 2000}),
        (xiaozhi.parse_text, {"type": "abort", "reason": "r" * 2000}),
    ],
)
def test_every_protocols_string_fields_are_bounded(parse, frame):
    with pytest.raises(ProtocolError) as err:
        parse(json.dumps(frame), max_string_chars=1024)
    assert err.value.code == "field_too_long" and "at most 1024" in str(err.value)
    parse(json.dumps(frame))  # unbounded when no limit is given (pure use, tests)


def test_token_bucket_allows_a_burst_then_the_sustained_rate():
    clock = ManualClock()
    bucket = TokenBucket(rate_per_s=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.15  # one and a half tokens back
    assert [bucket.take() for _ in range(2)] == [True, False]
    clock.now += 60  # an idle minute refills to the burst, not past it
    assert sum(bucket.take() for _ in range(20)) == 5


def test_token_bucket_never_refuses_a_client_under_the_rate():
    clock = ManualClock()
    bucket = TokenBucket(rate_per_s=10, burst=1, clock=clock)
    taken = []
    for _ in range(100):
        clock.now += 0.11
        taken.append(bucket.take())
    assert all(taken)

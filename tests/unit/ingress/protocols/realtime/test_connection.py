"""The OpenAI Realtime transcription protocol's pure parts: both session shapes, the events, the
error shape, the audio formats (G.711 tables, streamed 24 kHz -> 16 kHz)."""

import asyncio
import base64
import json
import math
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

from speech_serve import messages as realtime_wire
from speech_serve.ingress.audio import ALAW_TABLE, ULAW_TABLE, alaw_to_pcm16, ulaw_to_pcm16
from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.protocols.realtime.connection import (
    InputAudio,
    RealtimeConnection,
    render_completed,
    render_error,
    render_session,
)
from speech_serve.ingress.protocols.realtime.events import EXTRA, LOGPROBS, SessionConfig, TurnDetection
from speech_serve.ingress.sessions import replica_refusal
from speech_serve.ingress.stream.calls import ModelCalls
from speech_serve.ingress.stream.stream import UtteranceStreams
from speech_serve.messages import SpeakerInfo, UtteranceResult
from speech_serve.settings import AppSettings, SpeakerSettings
from speech_serve.wire.codes import CLOSE_TRY_AGAIN_LATER
from tests.support.fakes import MemoryWebSocket


def sine(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


class ScriptedVad:
    """A VADHost that hears speech from 300 to 1100 ms of every session (events when its chunk
    covers them) and records each chunk's end silence."""

    def __init__(self):
        self.end_silences: list[int | None] = []

        async def remote(lane, items):
            results = []
            for item in items:
                if item.chunk is None:
                    results.append(realtime_wire.VadFeedResult(events=[]))
                    continue
                self.end_silences.append(item.chunk.end_silence_ms)
                a = item.chunk.start_ms
                b = a + len(item.chunk.pcm) // 16
                events = [
                    realtime_wire.VadEvent(kind, ms) for kind, ms in (("start", 300), ("end", 1100)) if a <= ms < b
                ]
                results.append(realtime_wire.VadFeedResult(events=events))
            return results

        self.feed_many = SimpleNamespace(remote=remote)


async def _transcribe(request):
    return realtime_wire.Transcript("hello there", "en", "happy", "Speech", "<|en|>hello there")


def realtime_session(frames: list[dict], until, settings: AppSettings | None = None,
                     transcribe=_transcribe) -> tuple[list[dict], ScriptedVad]:  # fmt: skip
    """A RealtimeConnection run until `until(sent)` holds (10 s hang guard), then the client leaves."""
    settings = settings or AppSettings(limits={"max_audio_rate": None}, realtime={"interim_interval_ms": None})
    vad = ScriptedVad()

    async def scenario():
        ws = MemoryWebSocket()
        metrics = IngressMetrics()
        asr = SimpleNamespace(transcribe=SimpleNamespace(remote=transcribe),
                              transcribe_interim=SimpleNamespace(remote=transcribe))
        served = settings.model_copy(update={"speaker": SpeakerSettings(enabled=False),
                                             "stream": settings.stream.model_copy(update={"vad_batch_interval_ms": 0})})
        models = ModelCalls(vad, asr, None, served)
        streams = UtteranceStreams(models, settings, metrics, "test")
        conn = RealtimeConnection(ws, "s1", streams, settings.limits, metrics, settings.realtime, 600)
        session = asyncio.create_task(conn.run())
        for frame in frames:
            ws.inbox.put_nowait(frame)
        for _ in range(1000):
            if session.done() or until(ws.sent):
                break
            await asyncio.sleep(0.01)
        ws.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(session, 10)
        return ws.sent

    return asyncio.run(scenario()), vad


def client(event: dict) -> dict:
    return {"type": "websocket.receive", "text": json.dumps(event)}


def append(ms: int) -> dict:
    pcm = (np.ones(24 * ms) * 1000).astype("<i2").tobytes()
    return client({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})


def completed(sent: list[dict]) -> list[dict]:
    return [e for e in sent if e["type"] == "conversation.item.input_audio_transcription.completed"]


def test_error_events_have_openais_shape():
    body = json.loads(render_error("event_9", "invalid_value", "bad type", "type", "client-7"))
    assert body == {
        "type": "error", "event_id": "event_9",
        "error": {"type": "invalid_request_error", "code": "invalid_value", "message": "bad type", "param": "type",
                  "event_id": "client-7"},
    }  # fmt: skip
    busy = json.loads(render_error("event_1", "server_busy", "full"))["error"]
    assert (busy["type"], busy["param"], busy["event_id"]) == ("server_error", None, None)


def test_session_events_in_both_shapes():
    config = SessionConfig(turn_detection=TurnDetection(silence_duration_ms=600))
    created = json.loads(render_session("session.created", "event_1", "abc", config))
    assert created["type"] == "session.created" and created["event_id"] == "event_1"
    session = created["session"]
    assert (session["id"], session["object"], session["type"]) == ("sess_abc", "realtime.transcription_session",
                                                                    "transcription")  # fmt: skip
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 600}  # fmt: skip
    manual_alaw = SessionConfig(audio_format="audio/pcma", turn_detection=None)
    beta = json.loads(render_session("transcription_session.updated", "event_2", "abc", manual_alaw))
    assert beta["type"] == "transcription_session.updated"
    assert (beta["session"]["input_audio_format"], beta["session"]["turn_detection"]) == ("g711_alaw", None)


def test_completed_carries_the_transcript_and_our_fields_in_one_object():
    result = UtteranceResult(
        session_id="s", index=1, start_ms=500, end_ms=2800, text="hello", language="en", emotion="happy",
        event="Speech", raw_text="<|en|>hello", speaker=SpeakerInfo("alice", 0.9, "spk1", "s:1"), models="test",
        latency_ms={"asr_ms": 40.0},
    )  # fmt: skip
    body = json.loads(render_completed("event_5", "item_s_2", result))
    ours = body.pop(EXTRA)
    assert body == {
        "type": "conversation.item.input_audio_transcription.completed", "event_id": "event_5",
        "item_id": "item_s_2", "content_index": 0, "transcript": "hello", "usage": {"type": "duration", "seconds": 2.3},
    }  # fmt: skip
    assert (ours["language"], ours["emotion"], ours["event"], ours["speaker"]["label"]) == ("en", "happy", "Speech",
                                                                                            "alice")  # fmt: skip
    assert (ours["index"], ours["start_ms"], ours["end_ms"], ours["latency_ms"]) == (1, 500, 2800, {"asr_ms": 40.0})


def test_g711_tables_decode_known_codes():
    # ITU-T G.711: mu-law 0xFF and 0x7F are zero, 0x00 / 0x80 the extremes; A-law 0xD5 / 0x55 are +-8
    assert ulaw_to_pcm16(bytes([0xFF, 0x7F, 0x00, 0x80, 0xF0])).tolist() == [0, 0, -32124, 32124, 120]
    assert alaw_to_pcm16(bytes([0xD5, 0x55, 0xAA, 0x2A])).tolist() == [8, -8, 32256, -32256]
    with warnings.catch_warnings():  # the reference only: the code never imports audioop
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

    every = bytes(range(256))
    assert np.array_equal(np.frombuffer(audioop.ulaw2lin(every, 2), "<i2"), ULAW_TABLE)
    assert np.array_equal(np.frombuffer(audioop.alaw2lin(every, 2), "<i2"), ALAW_TABLE)


def test_24khz_appends_of_any_size_resample_as_one_stream():
    audio = sine(24000, 1.0)
    whole = InputAudio("audio/pcm")(audio.tobytes())
    pieces, at, sizes = [], 0, [480, 2, 1234, 4800, 17, 960]  # samples: odd sizes and 20 ms frames
    chunked = InputAudio("audio/pcm")
    while at < len(audio):
        n = sizes[len(pieces) % len(sizes)]
        pieces.append(chunked(audio[at : at + n].tobytes()))
        at += n
    got = np.concatenate(pieces)
    assert abs(len(got) - len(whole)) <= 16 and len(whole) > 15_000  # 16 kHz, less the filter's delay
    n = min(len(got), len(whole))
    assert np.abs(got[:n].astype(int) - whole[:n]).max() <= 4  # rounding, no click at any boundary
    spectrum = np.abs(np.fft.rfft(whole.astype(float)))
    assert abs(np.argmax(spectrum) * 16000 / len(whole) - 440) < 5  # still the 440 Hz tone, now at 16 kHz


def test_g711_appends_come_out_at_16khz():
    ulaw = bytes([0xFF] * 800)  # 100 ms of silence at 8 kHz
    decode = InputAudio("audio/pcmu")
    out = np.concatenate([decode(ulaw) for _ in range(10)])
    assert 14_000 < len(out) <= 16_000 and np.abs(out).max() <= 2  # less the resampler's delay; silence


def test_odd_pcm16_is_refused():
    from speech_serve.wire.pcm import AudioFormatError

    with pytest.raises(AudioFormatError):
        InputAudio("audio/pcm")(b"\x00\x01\x02")


def test_server_vad_frames_each_utterance_and_a_bad_event_is_answered_in_between():
    update = {"type": "session.update", "session": {"type": "transcription",
              "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 450}}}}}  # fmt: skip
    frames = [client(update), append(500), client({"type": "nope", "event_id": "c1"}), append(1000)]
    sent, vad = realtime_session(frames, until=lambda sent: completed(sent))
    kinds = [e["type"] for e in sent]
    # the VAD runs beside the frame loop: the error may come before or after speech_started
    assert [k for k in kinds if k != "error"] == [
        "session.created", "session.updated", "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
    ] and kinds.count("error") == 1 and kinds.index("error") < kinds.index("input_audio_buffer.speech_stopped")
    (error,) = [e for e in sent if e["type"] == "error"]
    started, stopped, committed, done = [e for e in sent[2:] if e["type"] != "error"]
    assert error["error"] == {"type": "invalid_request_error", "code": "invalid_value", "param": "type",
                              "event_id": "c1", "message": error["error"]["message"]}  # fmt: skip
    assert (started["audio_start_ms"], stopped["audio_end_ms"]) == (300, 1100)
    assert started["item_id"] == stopped["item_id"] == committed["item_id"] == done["item_id"]
    assert committed["previous_item_id"] is None and done["transcript"] == "hello there"
    assert done["speech_serve"]["language"] == "en" and done["speech_serve"]["start_ms"] == 300
    assert len({e["event_id"] for e in sent}) == len(sent)
    assert set(vad.end_silences) == {450}  # silence_duration_ms reached the VAD with every chunk


def test_manual_turns_cut_at_commit_and_an_empty_commit_is_an_error():
    manual = {"type": "transcription_session.update", "session": {"turn_detection": None}}
    frames = [client(manual), client({"type": "input_audio_buffer.commit", "event_id": "c0"}), append(700),
              client({"type": "input_audio_buffer.commit"}), append(300), client({"type": "input_audio_buffer.clear"}),
              append(200), client({"type": "input_audio_buffer.commit"})]  # fmt: skip
    sent, vad = realtime_session(frames, until=lambda sent: len(completed(sent)) == 2)
    kinds = [e["type"] for e in sent]
    assert "input_audio_buffer.speech_started" not in kinds and not vad.end_silences  # no VAD call at all
    assert kinds[:3] == ["session.created", "transcription_session.updated", "error"]
    assert sent[1]["session"]["turn_detection"] is None
    assert sent[2]["error"]["code"] == "input_audio_buffer_commit_empty" and sent[2]["error"]["event_id"] == "c0"
    assert "input_audio_buffer.cleared" in kinds
    committed = [e for e in sent if e["type"] == "input_audio_buffer.committed"]
    first, second = completed(sent)
    assert [c["item_id"] for c in committed] == [first["item_id"], second["item_id"]]
    assert committed[1]["previous_item_id"] == committed[0]["item_id"]
    # each turn is the audio since the last commit (less the resampler's delay, ~30 ms); the cleared
    # 300 ms belongs to neither
    turns = [(d["speech_serve"]["start_ms"], d["speech_serve"]["end_ms"]) for d in (first, second)]
    assert np.allclose(turns, [(0, 700), (1000, 1200)], atol=40), turns


def test_a_committed_piece_too_short_to_recognise_gets_an_empty_transcript():
    manual = {"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}}
    frames = [client(manual), append(530), client({"type": "input_audio_buffer.commit"}), append(40),
              client({"type": "input_audio_buffer.commit"})]  # fmt: skip
    sent, _ = realtime_session(frames, until=lambda sent: len(completed(sent)) == 2)
    committed = [e["item_id"] for e in sent if e["type"] == "input_audio_buffer.committed"]
    words, blip = sorted(completed(sent), key=lambda e: committed.index(e["item_id"]))
    assert words["transcript"] == "hello there" and blip["transcript"] == ""
    assert blip["speech_serve"]["skipped"] == "too_short" and blip["speech_serve"]["index"] is None
    assert 0 < blip["speech_serve"]["end_ms"] - blip["speech_serve"]["start_ms"] < 50  # under min_utterance_ms


def test_a_refused_session_gets_an_error_event_and_the_close_code():
    async def scenario():
        ws = MemoryWebSocket()
        settings = AppSettings()
        metrics = IngressMetrics()
        models = ModelCalls(None, None, None, settings)
        streams = UtteranceStreams(models, settings, metrics, "test")
        conn = RealtimeConnection(ws, "s1", streams, settings.limits, metrics, settings.realtime, 600)
        await conn.refuse(replica_refusal(draining=False, live_here=5, max_per_replica=5))
        return ws

    ws = asyncio.run(scenario())
    (busy,) = ws.sent
    assert busy["type"] == "error" and busy["error"]["code"] == "server_busy"
    assert busy["error"]["type"] == "server_error" and ws.closed[0] == CLOSE_TRY_AGAIN_LATER


@pytest.mark.parametrize("ms", [1000, 5000])
def test_appends_of_one_and_five_seconds_of_24khz_audio_are_taken(ms):
    """OpenAI takes events up to 15 MiB; a 5 s append is 640 kB of base64, ten times the bound on a
    control frame (it was closed with 1009 past about 1.3 s)."""
    frames = [append(ms), append(ms)]
    sent, _ = realtime_session(frames, lambda sent: completed(sent))
    assert completed(sent) and not [e for e in sent if e["type"] == "error"]


def test_an_append_padded_around_empty_audio_is_paced_as_the_audio_it_could_carry():
    """An append is audio, not control, so it skipped the control budget; with empty audio it skipped
    the audio pace too, and 60 kB of JSON to parse ten times a second froze the event loop."""
    settings = AppSettings(limits={"max_audio_rate": 1.0, "rate_window_s": 1.0})

    async def scenario():
        ws = MemoryWebSocket()
        metrics = IngressMetrics()
        served = settings.model_copy(update={"speaker": SpeakerSettings(enabled=False)})
        streams = UtteranceStreams(ModelCalls(ScriptedVad(), None, None, served), settings, metrics, "test")
        conn = RealtimeConnection(ws, "s1", streams, settings.limits, metrics, settings.realtime, 600)
        padded = client({"type": "input_audio_buffer.append", "audio": "", "pad": ["x" * 1000] * 62})
        session = asyncio.create_task(conn.run())
        for _ in range(3):
            ws.inbox.put_nowait(padded)
        for _ in range(500):  # until the third is taken (or 5 s)
            if conn.intake.paced_s > 0 or session.done():
                break
            await asyncio.sleep(0.01)
        ws.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(session, 10)
        return conn.intake.paced_s, ws.sent

    paced_s, sent = asyncio.run(scenario())
    assert paced_s > 0  # 62 kB could carry 1.3 s of 24 kHz audio each: the second and third wait
    assert not [e for e in sent if e["type"] == "error"]  # paced, not refused


def test_a_clear_after_deltas_forgets_the_cleared_items_text():
    """Each `clear` after an interim left the cleared item's delta text behind for the session's life."""

    async def scenario():
        settings = AppSettings()
        conn = RealtimeConnection(MemoryWebSocket(), "s1", None, settings.limits, IngressMetrics(), settings.realtime,
                                  600)  # fmt: skip

        async def nothing():
            return None

        conn.stream = SimpleNamespace(clear=nothing, use_vad=nothing, begin_utterance=nothing)
        for n in range(50):
            await conn._on_interim(n, realtime_wire.Transcript(f"words of turn {n}", "en", "", "", ""))
            await conn._clear()
        return conn

    conn = asyncio.run(scenario())
    assert conn._deltas == {}


def test_prompt_and_keywords_are_hotwords_and_include_asks_for_log_probabilities():
    """The transcription's prompt (comma-separated phrases) and keywords are the session's hotwords;
    `include: [LOGPROBS]` asks for words, and deltas and .completed carry OpenAI's `logprobs`. A bad
    list is an error event and leaves the session's list as it was."""
    asked = []

    async def transcribe(request):
        asked.append(request)
        words = (realtime_wire.Word("hello", 300, 600, 0.9), realtime_wire.Word("there", 600, 1000, 0.5))
        return realtime_wire.Transcript("hello there", "en", "happy", "Speech", "<|en|>hello there", words=words,
                                        confidence=0.67)  # fmt: skip

    transcription = {"model": "sensevoice", "prompt": "Xiaozhi, kitchen light", "keywords": ["lamp", "Xiaozhi"]}
    update = {"type": "session.update", "session": {"type": "transcription", "include": [LOGPROBS],
                                                    "audio": {"input": {"transcription": transcription}}}}  # fmt: skip
    bad = {"type": "session.update", "event_id": "c2", "session": {"audio": {"input": {"transcription": {
        "keywords": ["x" * 41]}}}}}  # fmt: skip
    settings = AppSettings(limits={"max_audio_rate": None}, realtime={"interim_interval_ms": 200})
    sent, _ = realtime_session([client(update), client(bad)] + [append(100)] * 15, until=lambda sent: completed(sent),
                               settings=settings, transcribe=transcribe)  # fmt: skip
    updated = next(e for e in sent if e["type"] == "session.updated")
    assert updated["session"]["include"] == [LOGPROBS]
    (error,) = [e for e in sent if e["type"] == "error"]
    assert (error["error"]["code"], error["error"]["event_id"]) == ("invalid_value", "c2")
    assert asked and all(r.hotwords == (("Xiaozhi", 1.5), ("kitchen light", 1.5), ("lamp", 1.5)) for r in asked)
    assert all(r.words for r in asked)
    deltas = [e for e in sent if e["type"].endswith("transcription.delta")]
    assert deltas and deltas[0]["logprobs"][0] == {"token": "hello", "logprob": round(math.log(0.9), 4),
                                                   "bytes": list(b"hello")}  # fmt: skip
    (done,) = completed(sent)
    assert [lp["token"] for lp in done["logprobs"]] == ["hello", "there"]
    assert done["speech_serve"]["words"][1] == {"text": "there", "start_ms": 900, "end_ms": 1300, "confidence": 0.5}

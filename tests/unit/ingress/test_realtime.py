"""The OpenAI Realtime transcription protocol's pure parts: both session shapes, the events, the
error shape, the audio formats (G.711 tables, streamed 24 kHz -> 16 kHz)."""

import base64
import json
import warnings

import numpy as np
import pytest

from serve_app.ingress import realtime
from serve_app.ingress.audio import ALAW_TABLE, ULAW_TABLE, alaw_to_pcm16, ulaw_to_pcm16
from serve_app.ingress.connection import ProtocolError
from serve_app.ingress.realtime import (
    Append,
    Clear,
    Commit,
    EventError,
    InputAudio,
    SessionConfig,
    SessionUpdate,
    TurnDetection,
    apply_update,
    effective,
    parse_event,
)
from serve_app.settings import RealtimeSettings
from serve_app.wire import SpeakerInfo, UtteranceResult

MAX_CHARS = 64
GA_UPDATE = {
    "type": "session.update",
    "event_id": "evt_1",
    "session": {
        "type": "transcription",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "noise_reduction": {"type": "near_field"},
                "transcription": {"model": "gpt-4o-transcribe", "language": "en", "prompt": "numbers"},
                "turn_detection": {
                    "type": "server_vad",
                    "silence_duration_ms": 400,
                    "prefix_padding_ms": 200,
                    "threshold": 0.6,
                },  # fmt: skip
            }
        },
        "include": ["item.input_audio_transcription.logprobs"],
    },
}
BETA_UPDATE = {
    "type": "transcription_session.update",
    "session": {
        "input_audio_format": "g711_ulaw",
        "input_audio_transcription": {"model": "whisper-1", "language": "zh"},
        "turn_detection": None,
        "input_audio_noise_reduction": None,
    },
}


def parse(data) -> realtime.ClientEvent:
    return parse_event(json.dumps(data), MAX_CHARS)


def test_ga_session_update_sets_every_field_we_serve():
    update = parse(GA_UPDATE)
    assert isinstance(update, SessionUpdate) and not update.beta and update.event_id == "evt_1"
    config = apply_update(SessionConfig(), update)
    assert config == SessionConfig(
        audio_format="audio/pcm", model="gpt-4o-transcribe", language="en", prompt="numbers",
        turn_detection=TurnDetection(silence_duration_ms=400, prefix_padding_ms=200, threshold=0.6),
    )  # fmt: skip


def test_beta_session_update_and_manual_turns():
    update = parse(BETA_UPDATE)
    assert update.beta
    config = apply_update(SessionConfig(), update)
    assert (config.audio_format, config.model, config.language, config.turn_detection) == (
        "audio/pcmu", "whisper-1", "zh", None
    )  # fmt: skip


def test_an_update_changes_only_what_it_gives():
    config = apply_update(SessionConfig(), parse(GA_UPDATE))
    only_silence = {"type": "session.update", "session": {"type": "transcription",
                    "audio": {"input": {"turn_detection": {"silence_duration_ms": 900}}}}}  # fmt: skip
    after = apply_update(config, parse(only_silence))
    assert after.turn_detection == TurnDetection(silence_duration_ms=900, prefix_padding_ms=200, threshold=0.6)
    assert (after.language, after.model, after.audio_format) == ("en", "gpt-4o-transcribe", "audio/pcm")
    # semantic_vad is served by the same VAD, and said so
    semantic = {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}}
    assert apply_update(SessionConfig(turn_detection=None), parse(semantic)).turn_detection == TurnDetection()


def test_the_served_end_silence_is_the_servers_default_or_the_clients_within_bounds():
    settings = RealtimeSettings(min_silence_duration_ms=200, max_silence_duration_ms=3000)
    silence = [
        effective(SessionConfig(turn_detection=TurnDetection(silence_duration_ms=ms)), 600, settings)
        .turn_detection.silence_duration_ms
        for ms in (None, 50, 450, 10_000)
    ]  # fmt: skip
    assert silence == [600, 200, 450, 3000]
    assert effective(SessionConfig(turn_detection=None), 600, settings).turn_detection is None


def test_audio_events():
    pcm = np.array([1, -2, 300], dtype="<i2").tobytes()
    append = parse({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode(), "event_id": "a"})
    assert append == Append(pcm, "a")
    assert parse({"type": "input_audio_buffer.commit"}) == Commit()
    assert parse({"type": "input_audio_buffer.clear", "event_id": "c"}) == Clear("c")


@pytest.mark.parametrize(
    "data, code, param",
    [
        ({"type": "response.create"}, "invalid_value", "type"),
        ({"event_id": "x"}, "invalid_value", "type"),
        ({"type": "input_audio_buffer.append"}, "missing_required_parameter", "audio"),
        ({"type": "input_audio_buffer.append", "audio": "not base64!"}, "invalid_value", "audio"),
        ({"type": "session.update"}, "missing_required_parameter", "session"),
        ({"type": "session.update", "session": {"type": "realtime"}}, "invalid_value", "session.type"),
        ({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/opus"}}}}},
         "invalid_value", "session.audio.input.format.type"),
        ({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}},
         "invalid_value", "session.audio.input.format.rate"),
        ({"type": "session.update", "session": {"audio": {"input": {"transcription": {"language": 5}}}}},
         "invalid_type", "session.audio.input.transcription.language"),
        ({"type": "session.update", "session": {"audio": {"input": {"transcription": {"prompt": "x" * 65}}}}},
         "string_above_max_length", "session.audio.input.transcription.prompt"),
        ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"silence_duration_ms": -1}}}}},
         "invalid_value", "session.audio.input.turn_detection.silence_duration_ms"),
        ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"threshold": 2}}}}},
         "invalid_value", "session.audio.input.turn_detection.threshold"),
        ({"type": "transcription_session.update", "session": {"input_audio_format": "mp3"}},
         "invalid_value", "session.input_audio_format"),
        ({"type": "session.update", "session": {"audio": "pcm"}}, "invalid_type", "session.audio"),
    ],
)  # fmt: skip
def test_bad_events_name_the_code_and_the_field(data, code, param):
    data = {**data, "event_id": "client-7"} if "event_id" not in data else data
    with pytest.raises(EventError) as err:
        parse(data)
    assert (err.value.code, err.value.param, err.value.event_id) == (code, param, data["event_id"])


def test_frames_that_are_not_json_objects_get_the_shared_errors():
    for text, code in (("not json", "invalid_json"), ("[1]", "bad_message")):
        with pytest.raises(ProtocolError) as err:
            parse_event(text, MAX_CHARS)
        assert err.value.code == code


def test_error_events_have_openais_shape():
    body = json.loads(realtime.render_error("event_9", "invalid_value", "bad type", "type", "client-7"))
    assert body == {
        "type": "error", "event_id": "event_9",
        "error": {"type": "invalid_request_error", "code": "invalid_value", "message": "bad type", "param": "type",
                  "event_id": "client-7"},
    }  # fmt: skip
    busy = json.loads(realtime.render_error("event_1", "server_busy", "full"))["error"]
    assert (busy["type"], busy["param"], busy["event_id"]) == ("server_error", None, None)


def test_session_events_in_both_shapes():
    config = SessionConfig(turn_detection=TurnDetection(silence_duration_ms=600))
    created = json.loads(realtime.render_session("session.created", "event_1", "abc", config))
    assert created["type"] == "session.created" and created["event_id"] == "event_1"
    session = created["session"]
    assert (session["id"], session["object"], session["type"]) == ("sess_abc", "realtime.transcription_session",
                                                                    "transcription")  # fmt: skip
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 600}  # fmt: skip
    manual_alaw = SessionConfig(audio_format="audio/pcma", turn_detection=None)
    beta = json.loads(realtime.render_session("transcription_session.updated", "event_2", "abc", manual_alaw))
    assert beta["type"] == "transcription_session.updated"
    assert (beta["session"]["input_audio_format"], beta["session"]["turn_detection"]) == ("g711_alaw", None)


def test_completed_carries_the_transcript_and_our_fields_in_one_object():
    result = UtteranceResult(
        session_id="s", index=1, start_ms=500, end_ms=2800, text="hello", language="en", emotion="happy",
        event="Speech", raw_text="<|en|>hello", speaker=SpeakerInfo("alice", 0.9, "spk1", "s:1"), models="test",
        latency_ms={"asr_ms": 40.0},
    )  # fmt: skip
    body = json.loads(realtime.render_completed("event_5", "item_s_2", result))
    ours = body.pop(realtime.EXTRA)
    assert body == {
        "type": "conversation.item.input_audio_transcription.completed", "event_id": "event_5",
        "item_id": "item_s_2", "content_index": 0, "transcript": "hello", "usage": {"type": "duration", "seconds": 2.3},
    }  # fmt: skip
    assert (ours["language"], ours["emotion"], ours["event"], ours["speaker"]["label"]) == ("en", "happy", "Speech",
                                                                                            "alice")  # fmt: skip
    assert (ours["index"], ours["start_ms"], ours["end_ms"], ours["latency_ms"]) == (1, 500, 2800, {"asr_ms": 40.0})


# ---- audio in -----------------------------------------------------------------------------------


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


def sine(rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


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
    from serve_app.wire import AudioFormatError

    with pytest.raises(AudioFormatError):
        InputAudio("audio/pcm")(b"\x00\x01\x02")

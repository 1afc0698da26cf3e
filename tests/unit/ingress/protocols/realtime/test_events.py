"""The OpenAI Realtime transcription protocol's pure parts: both session shapes, the events, the
error shape, the audio formats (G.711 tables, streamed 24 kHz -> 16 kHz)."""

import base64
import json

import numpy as np
import pytest

from speech_serve.ingress.protocols.parsing import ProtocolError
from speech_serve.ingress.protocols.realtime import events
from speech_serve.ingress.protocols.realtime.connection import InputAudio, render_session
from speech_serve.settings import RealtimeSettings

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


def parse(data) -> events.ClientEvent:
    return events.parse_event(json.dumps(data), MAX_CHARS)


def client(event: dict) -> dict:
    return {"type": "websocket.receive", "text": json.dumps(event)}


def append(ms: int) -> dict:
    pcm = (np.ones(24 * ms) * 1000).astype("<i2").tobytes()
    return client({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})


def test_ga_session_update_sets_every_field_we_serve():
    update = parse(GA_UPDATE)
    assert isinstance(update, events.SessionUpdate) and not update.beta and update.event_id == "evt_1"
    config = events.apply_update(events.SessionConfig(), update)
    assert config == events.SessionConfig(
        audio_format="audio/pcm", model="gpt-4o-transcribe", language="en", prompt="numbers", logprobs=True,
        turn_detection=events.TurnDetection(silence_duration_ms=400, prefix_padding_ms=200, threshold=0.6),
    )  # fmt: skip


def test_beta_session_update_and_manual_turns():
    update = parse(BETA_UPDATE)
    assert update.beta
    config = events.apply_update(events.SessionConfig(), update)
    assert (config.audio_format, config.model, config.language, config.turn_detection) == (
        "audio/pcmu", "whisper-1", "zh", None
    )  # fmt: skip


def test_an_update_changes_only_what_it_gives():
    config = events.apply_update(events.SessionConfig(), parse(GA_UPDATE))
    only_silence = {"type": "session.update", "session": {"type": "transcription",
                    "audio": {"input": {"turn_detection": {"silence_duration_ms": 900}}}}}  # fmt: skip
    after = events.apply_update(config, parse(only_silence))
    assert after.turn_detection == events.TurnDetection(silence_duration_ms=900, prefix_padding_ms=200, threshold=0.6)
    assert (after.language, after.model, after.audio_format) == ("en", "gpt-4o-transcribe", "audio/pcm")
    # semantic_vad is served by the same VAD, and said so
    semantic = {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}}
    served = events.apply_update(events.SessionConfig(turn_detection=None), parse(semantic))
    assert served.turn_detection == events.TurnDetection()


def test_pcm_at_other_rates_is_our_extension():
    at_16k = {
        "type": "session.update",
        "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
    }
    config = events.apply_update(events.SessionConfig(), parse(at_16k))
    assert (config.audio_format, config.pcm_rate) == ("audio/pcm", 16000)
    session = json.loads(render_session("session.updated", "e", "s", config))["session"]
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 16000}
    pcm = np.arange(-800, 800, dtype=np.int16)
    assert np.array_equal(InputAudio("audio/pcm", 16000)(pcm.tobytes()), pcm)  # no resampling at 16 kHz
    default_format = {"type": "session.update", "session": {"audio": {"input": {"format": {}}}}}
    back = events.apply_update(config, parse(default_format))
    assert back.pcm_rate == 24000  # a format without a rate is OpenAI's 24 kHz


def test_the_served_end_silence_is_the_servers_default_or_the_clients_within_bounds():
    settings = RealtimeSettings(min_silence_duration_ms=200, max_silence_duration_ms=3000)
    silence = [
        events.effective(events.SessionConfig(turn_detection=events.TurnDetection(silence_duration_ms=ms)), 600,
                         settings)  # fmt: skip
        .turn_detection.silence_duration_ms
        for ms in (None, 50, 450, 10_000)
    ]  # fmt: skip
    assert silence == [600, 200, 450, 3000]
    assert events.effective(events.SessionConfig(turn_detection=None), 600, settings).turn_detection is None


def test_audio_events():
    pcm = np.array([1, -2, 300], dtype="<i2").tobytes()
    append = parse({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode(), "event_id": "a"})
    assert append == events.Append(pcm, "a")
    lines = base64.encodebytes(bytes(range(256)) * 4).decode()  # MIME-style: 76 characters a line
    assert "\n" in lines and parse({"type": "input_audio_buffer.append", "audio": lines}).audio == bytes(range(256)) * 4
    crlf = lines.replace("\n", "\r\n")
    assert parse({"type": "input_audio_buffer.append", "audio": crlf}).audio == bytes(range(256)) * 4
    assert parse({"type": "input_audio_buffer.commit"}) == events.Commit()
    assert parse({"type": "input_audio_buffer.clear", "event_id": "c"}) == events.Clear("c")


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
        ({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 12345}}}}},
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
    with pytest.raises(events.EventError) as err:
        parse(data)
    assert (err.value.code, err.value.param, err.value.event_id) == (code, param, data["event_id"])


def test_frames_that_are_not_json_objects_get_the_shared_errors():
    for text, code in (("not json", "invalid_json"), ("[1]", "bad_message")):
        with pytest.raises(ProtocolError) as err:
            events.parse_event(text, MAX_CHARS)
        assert err.value.code == code

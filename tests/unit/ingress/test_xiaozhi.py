import json

import pytest

from speech_serve.ingress.connection import ProtocolError
from speech_serve.ingress.protocols import xiaozhi
from speech_serve.messages import SpeakerInfo, UtteranceResult
from speech_serve.wire.xiaozhi import frame_audio


def test_connect_params_from_headers_or_query():
    p = xiaozhi.connect_params(
        {"device-id": "aa", "client-id": "c", "protocol-version": "3", "authorization": "Bearer t"}, {}
    )
    assert p == xiaozhi.ConnectParams(3)  # the credentials are read by security.device_credentials
    q = xiaozhi.connect_params({}, {"device-id": "bb", "protocol-version": "2"})
    assert q == xiaozhi.ConnectParams(2) and xiaozhi.connect_params({}, {}) == xiaozhi.ConnectParams(1)
    with pytest.raises(ProtocolError) as err:
        xiaozhi.connect_params({"protocol-version": "9"}, {})
    assert err.value.code == "bad_protocol_version"


def test_hello_with_audio_params():
    hello = xiaozhi.parse_text(json.dumps({
        "type": "hello", "version": 1, "features": {"mcp": True}, "transport": "websocket",
        "audio_params": {"format": "opus", "sample_rate": 24000, "channels": 1, "frame_duration": 20},
    }))  # fmt: skip
    assert hello == xiaozhi.Hello("opus", 24000, 1, 20, {"mcp": True})


@pytest.mark.parametrize(
    "params",
    [{"format": "pcm"}, {"sample_rate": 44100}, {"channels": 2}, {"frame_duration": 33}],
)
def test_hello_refuses_audio_we_cannot_decode(params):
    with pytest.raises(ProtocolError) as err:
        xiaozhi.parse_text(json.dumps({"type": "hello", "audio_params": params}))
    assert err.value.code == "unsupported_audio"


def test_listen_abort_and_ignored_messages():
    assert xiaozhi.parse_text('{"type":"listen","state":"start","mode":"manual"}') == xiaozhi.Listen("start", "manual")
    assert xiaozhi.parse_text('{"type":"listen","state":"detect","text":"hi"}') == xiaozhi.Listen(
        "detect", "auto", "hi"
    )
    assert xiaozhi.parse_text('{"type":"abort","reason":"wake_word_detected"}') == xiaozhi.Abort("wake_word_detected")
    assert xiaozhi.parse_text('{"type":"mcp","payload":{}}') == xiaozhi.Ignored("mcp")


@pytest.mark.parametrize(
    "text, code",
    [
        ("{", "invalid_json"),
        ('"hello"', "bad_message"),
        ('{"type":"dance"}', "unknown_type"),
        ('{"type":"listen","state":"pause"}', "bad_message"),
        ('{"type":"listen","state":"start","mode":"turbo"}', "bad_message"),
        ('{"type":"hello","audio_params":[1]}', "bad_message"),
    ],
)
def test_malformed_control_frames(text, code):
    with pytest.raises(ProtocolError) as err:
        xiaozhi.parse_text(text)
    assert err.value.code == code


@pytest.mark.parametrize("version", [1, 2, 3])
def test_binary_framing_round_trip(version):
    packet = b"\xf8\x01\x02opus"
    frame = xiaozhi.parse_binary(frame_audio(packet, version, timestamp_ms=120), version, 1000)
    assert frame == xiaozhi.BinaryFrame("opus", packet)


def test_binary_json_frames_and_errors():
    body = b'{"type":"abort"}'
    v3 = xiaozhi.V3_HEADER.pack(xiaozhi.TYPE_JSON, 0, len(body)) + body
    assert xiaozhi.parse_binary(v3, 3, 1000) == xiaozhi.BinaryFrame("json", body)
    cases = {
        b"\x00\x00": (3, "bad_frame"),  # shorter than the header
        xiaozhi.V3_HEADER.pack(0, 0, 99) + b"abc": (3, "bad_frame"),  # size mismatch
        xiaozhi.V2_HEADER.pack(2, 7, 0, 0, 1) + b"x": (2, "bad_frame"),  # unknown type
        b"x" * 2000: (1, "frame_too_large"),
    }
    for data, (version, code) in cases.items():
        with pytest.raises(ProtocolError) as err:
            xiaozhi.parse_binary(data, version, 1000)
        assert err.value.code == code


def test_stt_carries_text_and_our_fields():
    result = UtteranceResult(
        session_id="s", index=1, start_ms=10, end_ms=900, text="hello", language="en", emotion="happy",
        event="Speech", raw_text="", speaker=SpeakerInfo(embedding_id="s:1"), models="test", latency_ms={"asr_ms": 5.0},
    )  # fmt: skip
    stt = json.loads(xiaozhi.render_stt("sess", result))
    assert (stt["type"], stt["session_id"], stt["text"]) == ("stt", "sess", "hello")
    assert (stt["language"], stt["emotion"], stt["event"], stt["models"]) == ("en", "happy", "Speech", "test")
    assert stt["speaker"]["embedding_id"] == "s:1" and stt["latency_ms"] == {"asr_ms": 5.0}
    hello = json.loads(xiaozhi.render_hello("sess", {"format": "opus"}))
    assert hello == {
        "type": "hello",
        "transport": "websocket",
        "session_id": "sess",
        "audio_params": {"format": "opus"},
    }

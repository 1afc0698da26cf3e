"""The Xiaozhi protocol (protocols/xiaozhi.py): connection parameters, hello, listen/abort, binary
framing, stt; Opus in; a device that never says hello."""

import asyncio
import json

import numpy as np
import pytest

from speech_serve.ingress.protocols import xiaozhi
from speech_serve.ingress.protocols.parsing import ProtocolError
from speech_serve.ingress.protocols.xiaozhi import OpusDecoder
from speech_serve.messages import SpeakerInfo, UtteranceResult, Word
from speech_serve.settings import AppSettings
from speech_serve.wire.opus import encode_pcm
from speech_serve.wire.pcm import AudioFormatError
from speech_serve.wire.xiaozhi import frame_audio
from tests.support.fakes import MemoryWebSocket, connection


def test_a_device_that_sends_no_hello_is_closed_after_the_hello_timeout():
    from speech_serve.ingress.protocols.xiaozhi import XiaozhiConnection

    async def scenario():
        ws = MemoryWebSocket()
        ws.headers, ws.query_params = {"device-id": "02:00:00:00:00:09", "protocol-version": "1"}, {}
        settings = AppSettings(xiaozhi={"hello_timeout_s": 0.2})
        handler = connection(XiaozhiConnection, ws, settings, "s1", settings.xiaozhi)
        await asyncio.wait_for(handler.run(), 5)
        return ws

    ws = asyncio.run(scenario())
    assert ws.sent[-1]["code"] == "hello_timeout" and ws.closed[0] == 1002


def test_connect_params_from_headers_or_query():
    p = xiaozhi.connect_params(
        {"device-id": "aa", "client-id": "c", "protocol-version": "3", "authorization": "Bearer t"}, {}
    )
    assert p == xiaozhi.ConnectParams(3)  # the credentials are read by auth.device_credentials
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
    assert "words" not in stt and "confidence" not in stt  # not asked for
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


def test_a_hello_carries_hotwords_and_asks_for_words_and_each_stt_has_them():
    sent = {"type": "hello", "audio_params": {"format": "opus"}, "hotwords": {"小智": 3, "turn on the light": 1.5},
            "words": True}  # fmt: skip
    hello = xiaozhi.parse_text(json.dumps(sent))
    assert hello.words and hello.hotwords == (("小智", 3.0), ("turn on the light", 1.5))
    for bad, code in (({"hotwords": ["x" * 41]}, "bad_hotwords"), ({"hotwords": {"a": -1}}, "bad_hotwords"),
                      ({"words": "yes"}, "bad_message")):  # fmt: skip
        with pytest.raises(ProtocolError) as err:
            xiaozhi.parse_text(json.dumps({"type": "hello", **bad}))
        assert err.value.code == code
    result = UtteranceResult(
        session_id="s", index=0, start_ms=1000, end_ms=1900, text="turn on the light", language="en", emotion="",
        event="", raw_text="", speaker=SpeakerInfo(), models="test", latency_ms={}, confidence=0.81234,
        words=(Word("turn", 1000, 1180, 0.9), Word("on", 1180, 1300, 0.7)),
    )  # fmt: skip
    stt = json.loads(xiaozhi.render_stt("sess", result))
    assert stt["words"][0] == {"text": "turn", "start_ms": 1000, "end_ms": 1180, "confidence": 0.9}
    assert stt["confidence"] == 0.812


def test_opus_round_trip_keeps_the_speech(two_utterances):
    packets = encode_pcm(two_utterances, frame_ms=60)
    assert len(packets) == pytest.approx(len(two_utterances) / 960, abs=2)
    decoder = OpusDecoder()
    out = np.concatenate([decoder.decode(p) for p in packets])
    assert abs(len(out) - len(two_utterances)) < 2000 and out.dtype == np.int16
    a, b = two_utterances[4000:100000].astype(float), out[4000:100000].astype(float)
    lag = max(range(0, 400, 4), key=lambda s: np.corrcoef(a, out[4000 + s : 100000 + s].astype(float))[0, 1])
    assert np.corrcoef(a, out[4000 + lag : 100000 + lag].astype(float))[0, 1] > 0.8
    assert np.corrcoef(a, b)[0, 1] < 1.0  # lossy, as Opus is


# Opus has no checksum: random bytes behind a valid first (TOC) byte decode as noise. These are
# structurally invalid (bad frame counts or lengths), which libopus does reject.
@pytest.mark.parametrize("packet", [b"", b"\x01\x02 this is not opus at all", b"\x03\x00", b"\x03\xff" + b"x" * 10])
def test_garbage_is_a_format_error_and_the_decoder_survives(packet, two_utterances):
    decoder = OpusDecoder()
    with pytest.raises(AudioFormatError):
        decoder.decode(packet)
    assert len(decoder.decode(encode_pcm(two_utterances[:960])[0])) > 0


@pytest.mark.parametrize("message", [
    {"type": "listen", "state": "detect", "text": ["x" * 60000]},
    {"type": "abort", "reason": {"why": "x" * 60000}},
])  # fmt: skip
def test_a_listen_text_or_abort_reason_that_is_not_a_string_is_refused(message):
    """A list-valued wake word was str()ed and logged as a 60 KB line."""
    with pytest.raises(ProtocolError, match="must be a string") as raised:
        xiaozhi.parse_text(json.dumps(message), max_string_chars=1024)
    assert raised.value.code == "bad_message"

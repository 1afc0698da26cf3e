"""Property-based fuzzing of the pure protocol adapters and the Opus decoder.

Property: whatever a client sends (random text, random bytes, JSON of the wrong shape, binary
frames whose headers are truncated or whose lengths lie) comes back as a typed event or as the
module's documented error, with a short readable message; never any other exception. Where a
render/parse pair exists, well-formed messages round-trip.
Reproducible: derandomized (the examples follow from the test's code), no example database.
A hang guard (faulthandler) ends the run with a traceback if one call never returns."""

from __future__ import annotations

import base64
import faulthandler
import io
import json
import struct
import wave

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from speech_serve.ingress import auth as security
from speech_serve.ingress import files as openai_files
from speech_serve.ingress.audio import SUPPORTED_RATES, AudioTooLongError, decode_file
from speech_serve.ingress.connection import QueuedBytes
from speech_serve.ingress.limits import SessionIntake, SessionLimitExceeded
from speech_serve.ingress.protocols import funasr, plain, xiaozhi
from speech_serve.ingress.protocols.parsing import ProtocolError
from speech_serve.ingress.protocols.realtime.connection import render_session
from speech_serve.ingress.protocols.realtime.events import (
    BETA_FORMATS,
    FORMATS,
    TURN_TYPES,
    Append,
    SessionConfig,
    SessionUpdate,
    apply_update,
    effective,
    parse_event,
)
from speech_serve.ingress.protocols.xiaozhi import OpusDecoder
from speech_serve.messages import SpeakerInfo, UtteranceResult
from speech_serve.settings import LimitSettings, RealtimeSettings
from speech_serve.wire.opus import OPUS_FRAME_MS, OPUS_RATES, encode_pcm
from speech_serve.wire.pcm import AudioFormatError
from speech_serve.wire.xiaozhi import frame_audio
from tests.support.fakes import ManualClock

FUZZ = settings(
    max_examples=300,
    deadline=None,  # shared 2-core machines: timing noise is not a failure
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


MAX_FRAME = 64_000
MESSAGE_LIMIT = 300  # an error message a person can read, however large the input was
CODES = {
    "plain": {"invalid_json", "bad_message", "unknown_type", "bad_sample_rate", "bad_hotwords"},
    "plain_audio": {"frame_too_large", "bad_audio"},
    "xiaozhi": {"invalid_json", "bad_message", "unknown_type", "unsupported_audio"},
    "xiaozhi_binary": {"frame_too_large", "bad_frame"},
    "xiaozhi_connect": {"bad_protocol_version"},
    "funasr": {"invalid_json", "bad_message", "bad_mode", "bad_sample_rate", "unsupported_audio", "bad_hotwords"},
    "realtime": {
        "invalid_json",
        "bad_message",
        "invalid_value",
        "invalid_type",
        "missing_required_parameter",
        "string_above_max_length",
    },  # fmt: skip
}


HANG_GUARD_S = 120  # far beyond any one test here: only a hang gets there


@pytest.fixture(autouse=True)
def hang_guard():
    faulthandler.dump_traceback_later(HANG_GUARD_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def utf8_ok(text: str) -> bool:
    """Text a WebSocket text frame (and SQLite, and a log line) can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def assert_documented(exc: ProtocolError, codes: set[str]) -> None:
    message = str(exc)
    assert exc.code in codes, (exc.code, message)
    assert message and len(message) <= MESSAGE_LIMIT and utf8_ok(message), message
    assert message.isprintable(), message


def parse_or_error(parse, arg, codes: set[str]):
    """The parsed event, or None after checking the error is a documented one."""
    try:
        return parse(arg)
    except ProtocolError as exc:
        assert_documented(exc, codes)
        return None


# Client text, half of it with a lone UTF-16 surrogate inside: JSON escapes it (\\ud800) and
# json.loads gives it back as a str with no UTF-8 form.
_lone = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
surrogate_text = st.booleans().flatmap(
    lambda lone: (
        st.tuples(st.text(max_size=6), _lone, st.text(max_size=6)).map("".join) if lone else st.text(max_size=12)
    )
)


def _json(scalars: st.SearchStrategy) -> st.SearchStrategy:
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    )


well_formed_json = _json(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40))
json_values = _json(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40) | surrogate_text)


def one_field_off(required: dict, optional: dict) -> st.SearchStrategy[dict]:
    """Messages of a protocol's shape: every field right, or all right but one that is anything.
    One wrong field among right ones reaches the parser's later checks; all-wrong messages stop
    at the first."""
    right = st.fixed_dictionaries(required, optional=optional)
    keys = sorted({*required, *optional})
    off = st.tuples(right, st.sampled_from(keys), json_values).map(lambda t: {**t[0], t[1]: t[2]})
    return st.booleans().flatmap(lambda is_right: right if is_right else off)


# "Right" includes what a parser must take, or refuse cleanly, and has got wrong before: whole
# numbers as floats (16000.0), and free text with lone surrogates.
rates = st.sampled_from((8000, 12000, 16000, 24000, 48000, 44100, 11025))
whole = rates | rates.map(float)


def _dumps(value) -> str:
    return json.dumps(value, allow_nan=True)


def hostile_text(shaped: st.SearchStrategy) -> st.SearchStrategy[str]:
    """Text frames: half of them shaped like the protocol's messages (see one_field_off), the
    rest random text, any JSON, and the pathological: deep nesting, huge numbers."""
    others = st.one_of(
        st.text(max_size=200),
        json_values.map(_dumps),
        st.integers(1, 20_000).map(lambda depth: "[" * depth + "]" * depth),
        st.integers(1, 20_000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
        st.integers(4000, 6000).map(lambda digits: '{"type": "start", "sample_rate": ' + "9" * digits + "}"),
        st.binary(max_size=200).map(lambda b: b.decode("utf-8", errors="replace")),
    )
    return st.booleans().flatmap(lambda is_shaped: shaped.map(_dumps) if is_shaped else others)


plain_shaped = one_field_off(
    {"type": st.sampled_from(["start", "end"])},
    {
        "sample_rate": whole,
        "language": st.sampled_from(["auto", "en", "zh"]) | surrogate_text,
        "itn": st.booleans(),
        "return_embedding": st.booleans(),
        "speaker_group": surrogate_text,
    },
)


frame_durations = st.sampled_from(OPUS_FRAME_MS)
xiaozhi_shaped = one_field_off(
    {"type": st.sampled_from(["hello", "listen", "abort", "mcp", "iot", "goodbye", "ping"])},
    {
        "state": st.sampled_from(["start", "stop", "detect"]),
        "mode": st.sampled_from(xiaozhi.LISTEN_MODES),
        "text": surrogate_text,
        "reason": surrogate_text,
        "features": st.dictionaries(st.text(max_size=8), well_formed_json, max_size=3),
        "audio_params": one_field_off(
            {},
            {
                "format": st.just("opus"),
                "sample_rate": whole,
                "channels": st.sampled_from([1, 1.0]),
                "frame_duration": frame_durations | frame_durations.map(float),
            },
        ),
    },
)


funasr_shaped = one_field_off(
    {},
    {
        "mode": st.sampled_from(funasr.MODES),
        "audio_fs": whole,
        "wav_name": surrogate_text,
        "wav_format": st.sampled_from(["pcm", "wav"]),
        "is_speaking": st.booleans(),
        "is_end": st.booleans(),
        "itn": st.booleans(),
        "hotwords": surrogate_text,
        "speaker_group": surrogate_text,
        "chunk_size": st.just([5, 10, 5]),
    },
)


_turn = one_field_off({}, {"type": st.sampled_from(TURN_TYPES), "silence_duration_ms": whole,
                           "prefix_padding_ms": whole, "threshold": st.floats(-1, 2)})  # fmt: skip


_transcription = one_field_off({}, {"model": surrogate_text, "language": surrogate_text, "prompt": surrogate_text})
realtime_shaped = one_field_off(
    {
        "type": st.sampled_from(
            [
                "session.update",
                "transcription_session.update",
                "input_audio_buffer.append",
                "input_audio_buffer.commit",
                "input_audio_buffer.clear",
            ]
        )
    },  # fmt: skip
    {
        "event_id": surrogate_text,
        "audio": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | surrogate_text,
        "session": one_field_off(
            {},
            {
                "type": st.sampled_from(["transcription", "realtime"]),
                "audio": one_field_off(
                    {},
                    {
                        "input": one_field_off(
                            {},
                            {
                                "format": one_field_off({}, {"type": st.sampled_from(FORMATS), "rate": whole}),
                                "transcription": _transcription,
                                "turn_detection": st.none() | _turn,
                            },
                        )
                    },
                ),  # fmt: skip
                "input_audio_format": st.sampled_from([*BETA_FORMATS, "mp3"]),
                "input_audio_transcription": _transcription,
                "turn_detection": st.none() | _turn,
            },
        ),
    },
)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def results() -> st.SearchStrategy[UtteranceResult]:
    def make(index, start, length, text, language, score):
        return UtteranceResult(
            session_id="s", index=index, start_ms=start, end_ms=start + length, text=text, language=language,
            emotion=None, event=None, raw_text=text, speaker=SpeakerInfo(score=score), models="test",
        )  # fmt: skip

    return st.builds(
        make,
        st.integers(0, 1000),
        st.integers(0, 10**7),
        st.integers(0, 10**5),
        st.text(max_size=30),
        st.sampled_from([None, "en", "zh", "yue"]),
        st.none() | st.floats(-1, 1),
    )


CREDENTIAL_KEYS = ["device-id", "device_id", "client-id", "client_id", "authorization", "token", "z"]
FUZZ_SECRET = "fuzz-secret-0123456789"


def tokenish() -> st.SearchStrategy[str]:
    """Tokens as they come: any text (non-ASCII, '²', fullwidth digits, surrogates), and near-misses
    of the real shape."""
    sig = st.text(st.sampled_from("AZaz09-_é²１\udcff"), min_size=40, max_size=46)
    ts = st.text(st.sampled_from("0123456789²１٣ "), min_size=0, max_size=14)
    return st.one_of(st.text(), st.builds(lambda a, b: f"{a}.{b}", sig, ts), st.builds(lambda t: f"Bearer {t}", sig))


def lying_frames() -> st.SearchStrategy[tuple[bytes, int]]:
    """v2/v3 frames whose header is truncated, whose type is unknown, or whose length lies."""

    def v2(kind, stated, payload, cut):
        return (xiaozhi.V2_HEADER.pack(2, kind, 0, 0, stated) + payload)[:cut], 2

    def v3(kind, stated, payload, cut):
        return (xiaozhi.V3_HEADER.pack(kind, 0, stated) + payload)[:cut], 3

    kinds = st.sampled_from([0, 1, 2, 255])
    payloads = st.binary(max_size=300)
    cuts = st.integers(0, 400)
    return st.one_of(
        st.builds(v2, kinds | st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), payloads, cuts),
        st.builds(v3, kinds, st.integers(0, 2**16 - 1), payloads, cuts),
        st.tuples(st.binary(max_size=400), st.sampled_from([1, 2, 3])),
    )


def wav_bytes(rate: int, frames: int, channels: int = 1) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(b"\x01\x00" * (frames * channels))
    return out.getvalue()


MAX_UPLOAD_S = 30.0
TOC = st.integers(0, 255)


@pytest.fixture(scope="module")
def good_packet(two_utterances) -> bytes:
    return encode_pcm(two_utterances[16000:16960])[0]


FIELD_LIMIT = 64
long_text = st.integers(0, 3 * FIELD_LIMIT).flatmap(lambda n: st.text(min_size=n, max_size=n))


def _strings_within(message, limit: int) -> bool:
    return all(len(v) <= limit for v in vars(message).values() if isinstance(v, str))


FLOOD_LIMITS = LimitSettings(
    max_audio_rate=1.5, max_frames_per_s=50, rate_window_s=2.0, max_queued_bytes=200_000, max_text_frame_bytes=4096
)


INTAKE_CODES = {"too_many_messages", "frame_too_large", "too_far_ahead"}
frames_in_time = st.lists(
    st.tuples(
        st.floats(0, 0.2),  # seconds since the previous frame
        st.sampled_from(["bytes", "text"]),
        st.integers(0, 8000),  # frame size (bytes, or characters of text)
        st.booleans(),  # handled by the frame loop at once (else it queues)
    ),
    max_size=400,
)


@FUZZ
@given(hostile_text(plain_shaped))
@example("[" * 100_000)  # nested deeper than the JSON decoder's recursion limit
@example('{"type": "start", "sample_rate": ' + "1" * 5000 + "}")  # past Python's int-digits limit
@example('{"type": "start", "sample_rate": 16000.0}')  # a float where an int belongs
@example('{"type": "start", "speaker_group": "\\ud800"}')  # a lone surrogate: no UTF-8 for it
@example(json.dumps({"type": "x" * 100_000}))  # the error must not echo the whole frame
def test_plain_text_frames(text):
    msg = parse_or_error(plain.parse_text, text, CODES["plain"])
    if isinstance(msg, plain.StartMessage):
        assert is_int(msg.sample_rate) and msg.sample_rate in plain.SUPPORTED_RATES
        assert isinstance(msg.language, str) and utf8_ok(msg.language)
        assert isinstance(msg.itn, bool) and isinstance(msg.return_embedding, bool)
        assert msg.speaker_group is None or (isinstance(msg.speaker_group, str) and utf8_ok(msg.speaker_group))
        json.loads(plain.render_ready("s", msg, "test", 200))
    else:
        assert msg is None or isinstance(msg, plain.EndMessage)


@FUZZ
@given(st.binary(max_size=2 * MAX_FRAME) | st.integers(0, MAX_FRAME).map(lambda n: b"\x00" * n))
def test_plain_audio_frames(data):
    pcm = parse_or_error(lambda d: plain.parse_audio(d, MAX_FRAME), data, CODES["plain_audio"])
    if pcm is not None:
        assert pcm.dtype == np.int16 and pcm.tobytes() == data  # PCM16 round trip


@FUZZ
@given(st.text(max_size=50), st.text(max_size=50))
def test_error_frames_are_json_whatever_the_message(code, message):
    for rendered in (plain.render_error(code, message), funasr.render_error(code, message)):
        assert utf8_ok(rendered)
        assert json.loads(rendered)["code"] == code
    rendered = xiaozhi.render_error("s", code, message)
    assert utf8_ok(rendered) and json.loads(rendered)["message"] == message


@FUZZ
@given(hostile_text(realtime_shaped))
@example("[" * 100_000)
@example(json.dumps({"type": "session.update", "session": {"input_audio_format": ["pcm16"]}}))  # unhashable
@example(json.dumps({"type": "input_audio_buffer.append", "audio": "é" * 8}))  # base64 of non-ASCII
@example(json.dumps({"type": "x" * 100_000, "event_id": "e" * 100_000}))
def test_realtime_events(text):
    event = parse_or_error(lambda t: parse_event(t, 64), text, CODES["realtime"])
    if event is None:
        return
    assert event.event_id is None or (isinstance(event.event_id, str) and len(event.event_id) <= 64)
    if isinstance(event, SessionUpdate):
        config = effective(apply_update(SessionConfig(), event), 600,
                                    RealtimeSettings())  # fmt: skip
        assert config.audio_format in FORMATS and config.pcm_rate in SUPPORTED_RATES
        for rendered in (render_session("session.updated", "e", "s", config),
                         render_session("transcription_session.updated", "e", "s", config)):  # fmt: skip
            assert utf8_ok(rendered) and json.loads(rendered)["session"]
        turn = config.turn_detection
        assert turn is None or (is_int(turn.silence_duration_ms) and 0 <= turn.threshold <= 1)
    elif isinstance(event, Append):
        assert isinstance(event.audio, bytes)


@FUZZ
@given(hostile_text(xiaozhi_shaped))
@example("[" * 100_000)
@example('{"type": "hello", "audio_params": {"sample_rate": ' + "7" * 5000 + "}}")
@example('{"type": "hello", "audio_params": {"channels": true}}')  # True == 1 in Python
@example('{"type": "hello", "audio_params": {"sample_rate": 16000.5}}')
@example(json.dumps({"type": "listen", "state": "s" * 100_000}))
@example(json.dumps({"type": [{f"k{i}" * 10: "v" * 40 for i in range(4)}] * 4}))  # 40 chars a string, 1000 in all
def test_xiaozhi_text_frames(text):
    msg = parse_or_error(xiaozhi.parse_text, text, CODES["xiaozhi"])
    if isinstance(msg, xiaozhi.Hello):
        assert msg.audio_format == "opus" and is_int(msg.sample_rate) and msg.sample_rate in OPUS_RATES
        assert is_int(msg.channels) and msg.channels == 1
        assert is_int(msg.frame_duration) and msg.frame_duration in OPUS_FRAME_MS
        assert isinstance(msg.features, dict)
    elif isinstance(msg, xiaozhi.Listen):
        assert msg.state in ("start", "stop", "detect") and msg.mode in xiaozhi.LISTEN_MODES
        assert isinstance(msg.text, str) and utf8_ok(msg.text)
    elif isinstance(msg, xiaozhi.Abort):
        assert isinstance(msg.reason, str) and utf8_ok(msg.reason)
    elif isinstance(msg, xiaozhi.Ignored):
        assert msg.kind in xiaozhi.KNOWN_IGNORED
    else:
        assert msg is None


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["device-id", "client-id", "protocol-version", "authorization", "x"]), st.text()),
    st.dictionaries(st.sampled_from(["device-id", "client-id", "protocol-version", "authorization", "y"]), st.text()),
)
def test_xiaozhi_connect_params(headers, query):
    params = parse_or_error(lambda h: xiaozhi.connect_params(h, query), headers, CODES["xiaozhi_connect"])
    assert params is None or params.protocol_version in (1, 2, 3)


@FUZZ
@given(tokenish(), st.one_of(st.none(), st.text(max_size=20)), st.one_of(st.none(), st.text(max_size=20)))
@example("é" * 43 + ".1800000000", "c", "d")
@example("a" * 43 + ".²", "c", "d")
def test_device_tokens_of_any_shape_are_a_decision_never_an_exception(token, client_id, device_id):
    decision = security.check_device(token, client_id, device_id, FUZZ_SECRET, 3600, now=1_800_000_000)
    assert not decision.ok and decision.status in (400, 401, 403) and decision.reason.isprintable()


@FUZZ
@given(
    st.dictionaries(st.sampled_from(CREDENTIAL_KEYS), st.text(max_size=30)),
    st.dictionaries(st.sampled_from(CREDENTIAL_KEYS), st.text(max_size=30)),
)
def test_device_credentials_are_read_one_way_or_refused(headers, query):
    try:
        creds = security.device_credentials(headers, query)
    except security.CredentialError as exc:
        assert exc.status == 400 and str(exc).isprintable()
        return
    for value, header, params in ((creds.device_id, "device-id", ("device_id", "device-id")),
                                  (creds.client_id, "client-id", ("client_id", "client-id"))):  # fmt: skip
        given = {v for v in (headers.get(header), *(query.get(p) for p in params)) if v}
        assert value == (given.pop() if given else None)  # the one value given, whoever reads it


@FUZZ
@given(lying_frames())
@example((b"", 2))
@example((b"\x00" * 15, 2))  # one byte short of the v2 header
@example((b"\x00\x00\x00", 3))  # one byte short of the v3 header
@example((xiaozhi.V3_HEADER.pack(0, 0, 0xFFFF) + b"x", 3))  # length says 65535, carries 1
@example((xiaozhi.V2_HEADER.pack(2, 0, 0, 0, 0xFFFFFFFF), 2))  # length says 4 GiB, carries 0
def test_xiaozhi_binary_frames(frame_and_version):
    data, version = frame_and_version
    frame = parse_or_error(lambda d: xiaozhi.parse_binary(d, version, MAX_FRAME), data, CODES["xiaozhi_binary"])
    if frame is not None:
        assert frame.kind in ("opus", "json") and isinstance(frame.payload, bytes)
        header = {1: 0, 2: xiaozhi.V2_HEADER.size, 3: xiaozhi.V3_HEADER.size}[version]
        assert frame.payload == data[header:]  # never more nor less than the frame carried


@FUZZ
@given(st.binary(max_size=2**16 + 10), st.sampled_from([1, 2, 3]), st.integers(0, 2**40))
@example(b"x" * (2**16), 3, 0)  # one byte more than a v3 header can state
def test_xiaozhi_framing_round_trip(packet, version, timestamp_ms):
    try:
        data = frame_audio(packet, version, timestamp_ms)
    except ValueError as exc:  # the one documented refusal: more than the header can state
        assert version == 3 and len(packet) > 0xFFFF and str(exc)
        return
    assert xiaozhi.parse_binary(data, version, len(data)) == xiaozhi.BinaryFrame("opus", packet)


@FUZZ
@given(
    st.sampled_from(OPUS_RATES),
    st.sampled_from(OPUS_FRAME_MS),
    st.dictionaries(st.text(max_size=8), well_formed_json, max_size=3),
    st.text(max_size=20),
)
def test_xiaozhi_hello_round_trip(rate, frame_ms, features, session_id):
    """Our hello, read back by the device-side parser, says what we put in it."""
    params = {"format": "opus", "sample_rate": rate, "channels": 1, "frame_duration": frame_ms}
    rendered = json.loads(xiaozhi.render_hello(session_id, params))
    hello = xiaozhi.parse_text(json.dumps({**rendered, "features": features}))
    assert (hello.audio_format, hello.sample_rate, hello.channels, hello.frame_duration) == ("opus", rate, 1, frame_ms)
    assert json.dumps(hello.features) == json.dumps(features)  # NaN != NaN, so compare as JSON


@FUZZ
@given(hostile_text(funasr_shaped), st.booleans(), results())
@example("[" * 100_000, False, None)
@example('{"mode": "offline", "audio_fs": ' + "8" * 5000 + "}", False, None)
@example('{"mode": "offline", "audio_fs": 16000.0}', False, None)
@example('{"mode": "2pass", "wav_name": "\\udc80"}', False, None)  # echoed in every answer
@example(json.dumps({"mode": "m" * 100_000}), False, None)
def test_funasr_text_frames(text, configured, result):
    msg = parse_or_error(lambda t: funasr.parse_text(t, configured), text, CODES["funasr"])
    if isinstance(msg, funasr.Config):
        assert msg.mode in funasr.MODES and is_int(msg.audio_fs) and msg.audio_fs in funasr.SUPPORTED_RATES
        assert isinstance(msg.wav_name, str) and isinstance(msg.itn, bool)
        assert all(isinstance(p, str) and 0 < w <= 5 for p, w in msg.hotwords)
        # every answer echoes wav_name: it must go out as a text frame
        for answer in (funasr.render_interim(msg, "a"), funasr.render_end(msg, 1)):
            assert utf8_ok(answer) and json.loads(answer)["wav_name"] == msg.wav_name
        if result is not None:
            answer = funasr.render_final(msg, result)
            assert utf8_ok(answer) and json.loads(answer)["wav_name"] == msg.wav_name
    else:
        assert msg is None or isinstance(msg, funasr.EndOfSpeech)


@FUZZ
@given(st.text(max_size=20), st.text(max_size=20))
def test_funasr_interim_deltas_add_up(sent, text):
    delta = funasr.text_delta(sent, text)
    if delta is None:
        assert not text.startswith(sent)
    else:
        assert sent + delta == text


@FUZZ
@given(st.text(max_size=200) | st.sampled_from(openai_files.RESPONSE_FORMATS))
@example("x" * 100_000)
def test_openai_response_format(fmt):
    try:
        assert openai_files.check_response_format(fmt) in openai_files.RESPONSE_FORMATS
    except openai_files.TranscriptionRequestError as exc:
        assert fmt not in openai_files.RESPONSE_FORMATS
        assert str(exc) and len(str(exc)) <= MESSAGE_LIMIT and utf8_ok(str(exc))


@FUZZ
@given(st.lists(results(), max_size=5), st.floats(0, 10**5))
def test_openai_render_round_trip(results_, duration_s):
    body, media = openai_files.render("verbose_json", results_, duration_s, "test")
    doc = json.loads(body)
    assert media == "application/json" and doc["text"] == " ".join(r.text for r in results_ if r.text).strip()
    assert [(s["id"], s["text"]) for s in doc["segments"]] == [(r.index, r.text) for r in results_]
    assert [s["end"] - s["start"] for s in doc["segments"]] == pytest.approx(
        [(r.end_ms - r.start_ms) / 1000 for r in results_]
    )
    assert json.loads(openai_files.render("json", results_, duration_s, "test")[0])["text"] == doc["text"]
    text, media = openai_files.render("text", results_, duration_s, "test")
    assert text == doc["text"] + "\n" and media.startswith("text/plain")


@FUZZ
@given(
    st.binary(max_size=2000)
    | st.builds(lambda head, tail: wav_bytes(16000, 100)[:head] + tail, st.integers(0, 60), st.binary(max_size=50))
    | st.builds(wav_bytes, st.integers(1, 4_000_000), st.integers(0, 4000), st.sampled_from([1, 2]))
)
@example(wav_bytes(1, 2000))  # 40 kB claiming 1 Hz: 2000 s of audio, 32 M samples once resampled
@example(wav_bytes(1_000_003, 1000))  # a ratio that made a polyphase resampler build a huge filter
@example(wav_bytes(2_000_000_000, 10))  # nanoseconds of audio: nothing left at 16 kHz
def test_uploaded_files_decode_or_get_a_format_error(data):
    """The /v1/audio/transcriptions upload: audio of at most `max_seconds`, AudioTooLongError
    (HTTP 413) past it, AudioFormatError (HTTP 400) for the rest."""
    try:
        pcm, duration_s = decode_file(data, MAX_UPLOAD_S)
    except AudioTooLongError as exc:
        with wave.open(io.BytesIO(data)) as w:  # only a file that really is that long
            assert w.getnframes() / w.getframerate() > MAX_UPLOAD_S, str(exc)
        return
    except AudioFormatError as exc:
        assert str(exc) and len(str(exc)) <= MESSAGE_LIMIT
        return
    assert pcm.dtype == np.int16 and 0 < len(pcm) and 0 < duration_s <= MAX_UPLOAD_S
    assert abs(len(pcm) - duration_s * 16000) <= 16  # the resampled length agrees with the header


@FUZZ
@given(
    st.lists(
        st.binary(max_size=1500) | st.builds(lambda toc, rest: bytes([toc]) + rest, TOC, st.binary(max_size=400)),
        min_size=1,
        max_size=8,
    )
)
@example([b""])
@example([b"\xfc"])  # code 3 TOC with no frame-count byte
@example([b"\xff\xff" + b"\xff" * 1000])
def test_opus_decoder_fed_random_bytes(good_packet, packets):
    """Garbage packets are AudioFormatError or noise, never bigger than Opus allows (120 ms),
    and the session's decoder still decodes a real packet afterwards."""
    decoder = OpusDecoder()
    for packet in packets:
        try:
            pcm = decoder.decode(packet)
        except AudioFormatError as exc:
            assert str(exc) and len(str(exc)) <= MESSAGE_LIMIT
            continue
        assert pcm.dtype == np.int16 and pcm.ndim == 1
        assert len(pcm) <= 16 * 120 + 256  # one packet holds at most 120 ms (+ the resampler's carry)
    assert len(decoder.decode(good_packet)) > 0


def test_the_v2_header_is_what_the_firmware_sends():
    """Not a fuzz property: the layout the lying-length cases above are built on."""
    assert xiaozhi.V2_HEADER.size == 16 and xiaozhi.V3_HEADER.size == 4
    assert struct.unpack(">HHIII", frame_audio(b"ab", 2, 7)[:16]) == (2, 0, 0, 7, 2)


@FUZZ
@given(
    st.sampled_from(["plain", "xiaozhi", "funasr"]),
    st.dictionaries(
        st.sampled_from(["language", "speaker_group", "wav_name", "hotwords", "text", "reason", "mode", "state"]),
        long_text,
        max_size=4,
    ),
    st.sampled_from([{"type": "start"}, {"type": "listen", "state": "detect"}, {"type": "abort"}, {"mode": "2pass"}]),
)
@example("funasr", {"wav_name": "w" * 100_000}, {"mode": "2pass"})  # echoed in every answer
@example("plain", {"speaker_group": "g" * 100_000}, {"type": "start"})  # kept, matched in SQLite
def test_string_fields_are_bounded_on_every_protocol(protocol, fields, base):
    """With a limit, a parsed message never carries a longer string; a longer field is
    `field_too_long` naming the field, in a short message."""
    parse = {
        "plain": plain.parse_text,
        "xiaozhi": xiaozhi.parse_text,
        "funasr": lambda t, **kw: funasr.parse_text(t, False, **kw),
    }[protocol]
    frame = json.dumps({**base, **fields})
    codes = CODES[protocol] | {"field_too_long"} | ({"unknown_type", "bad_message"} if protocol != "funasr" else set())
    msg = parse_or_error(lambda t: parse(t, max_string_chars=FIELD_LIMIT), frame, codes)
    too_long = [k for k, v in {**base, **fields}.items() if isinstance(v, str) and len(v) > FIELD_LIMIT]
    if msg is not None:
        assert not too_long and _strings_within(msg, FIELD_LIMIT)


@FUZZ
@given(frames_in_time)
@example([(0.0, "bytes", 2, True)] * 400)  # tiny frames as fast as they can go
@example([(0.0, "bytes", 8000, False)] * 40)  # a frame loop stuck while frames pile up
@example([(0.0, "text", 5000, True)])  # one text frame over the limit
def test_intake_bounds_whatever_a_client_floods(frames):
    """Whatever frames arrive, when: accepted ones stay within every bound (frames per window and
    text size refused past them with a documented code; audio per window held back; bytes queued
    past their bound close the session)."""
    clock = ManualClock(0.0)
    intake, unread = SessionIntake(FLOOD_LIMITS, clock), QueuedBytes(FLOOD_LIMITS.max_queued_bytes)
    window = FLOOD_LIMITS.rate_window_s
    accepted = audio = 0
    queued: list[dict] = []
    for dt, kind, size, handled_now in frames:
        clock.now += dt
        message = {"type": "websocket.receive", kind: b"\x00" * size if kind == "bytes" else "x" * size}
        try:
            intake.arrived(message)
            unread.add(message)  # frames left unread would fill the Ingress's memory (Serve reads them anyway)
        except SessionLimitExceeded as exc:
            assert exc.code in INTAKE_CODES and len(str(exc)) <= MESSAGE_LIMIT
            return
        if handled_now:
            unread.take(message)
            if kind == "bytes":
                clock.now += intake.audio_wait(size // 2)  # the session holds the audio back this long
                audio += size // 2
        else:
            queued.append(message)
        accepted += 1
        assert accepted <= FLOOD_LIMITS.max_frames_per_s * (window + clock.now) + 1
        assert audio <= FLOOD_LIMITS.max_audio_rate * 16_000 * (window + clock.now) + size // 2
        assert unread.count <= FLOOD_LIMITS.max_queued_bytes  # past it the session is closed
        assert kind == "bytes" or size <= FLOOD_LIMITS.max_text_frame_bytes


@FUZZ
@given(st.lists(st.tuples(st.floats(0.01, 0.1), st.floats(0, 1.5)), min_size=1, max_size=300))
def test_intake_never_refuses_a_live_client_with_jitter(frames):
    """A client sending real-time audio whose frames arrive late and then together (up to 1.5 s
    of jitter, inside the window) is never refused."""
    clock = ManualClock(0.0)
    intake = SessionIntake(LimitSettings(), clock)
    sent_s = 0.0
    for frame_s, jitter in frames:
        sent_s += frame_s
        clock.now = max(clock.now, sent_s + jitter)  # arrives late, never before it was spoken
        message = {"type": "websocket.receive", "bytes": b"\x00" * (2 * round(frame_s * 16_000))}
        intake.arrived(message)
        assert intake.audio_wait(round(frame_s * 16_000)) == 0  # never even slowed

import json

import numpy as np
import pytest

from speech_serve.ingress.protocols import plain
from speech_serve.ingress.protocols.parsing import ProtocolError
from speech_serve.messages import SpeakerInfo, UtteranceResult


def test_start_message_with_defaults_and_values():
    assert plain.parse_text('{"type": "start"}') == plain.StartMessage()
    msg = plain.parse_text('{"type":"start","sample_rate":48000,"language":"en","itn":false,"return_embedding":true}')
    assert msg == plain.StartMessage(48000, "en", False, True)


def test_end_message():
    assert isinstance(plain.parse_text('{"type": "end"}'), plain.EndMessage)


@pytest.mark.parametrize(
    "text, code",
    [
        ("not json", "invalid_json"),
        ("[1, 2]", "bad_message"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"no_type": 1}', "unknown_type"),
        ('{"type": "start", "sample_rate": 12345}', "bad_sample_rate"),
        ('{"type": "start", "itn": "yes"}', "bad_message"),
        ('{"type": "start", "language": 5}', "bad_message"),
    ],
)
def test_malformed_text_frames_get_a_named_error(text, code):
    with pytest.raises(ProtocolError) as err:
        plain.parse_text(text)
    assert err.value.code == code


def test_audio_frames():
    pcm = np.array([1, -2, 32767], dtype=np.int16)
    assert np.array_equal(plain.parse_audio(pcm.tobytes(), 100), pcm)
    with pytest.raises(ProtocolError) as err:
        plain.parse_audio(b"\x00\x01\x02", 100)
    assert err.value.code == "bad_audio"
    with pytest.raises(ProtocolError) as err:
        plain.parse_audio(b"\x00" * 102, 100)
    assert err.value.code == "frame_too_large"


def test_result_rendering_carries_every_field():
    result = UtteranceResult(
        session_id="s", index=2, start_ms=100, end_ms=900, text="hi", language="en", emotion="happy",
        event="Speech", raw_text="<|en|>hi", speaker=SpeakerInfo(embedding_id="s:2"), models="test",
        latency_ms={"asr_ms": 12.5}, batch_sizes={"asr": 3},
    )  # fmt: skip
    msg = json.loads(plain.render_result(result))
    assert msg["type"] == "result"
    assert (msg["index"], msg["text"], msg["start_ms"], msg["end_ms"]) == (2, "hi", 100, 900)
    assert (msg["language"], msg["emotion"], msg["event"], msg["models"]) == ("en", "happy", "Speech", "test")
    assert msg["speaker"] == {"label": "unknown", "score": None, "speaker_id": None, "embedding_id": "s:2"}
    assert msg["latency_ms"] == {"asr_ms": 12.5}
    assert "words" not in msg and "confidence" not in msg  # not asked for


def test_a_start_asks_for_words_and_hotwords_and_results_carry_them():
    from dataclasses import replace

    from speech_serve.messages import Word

    start = plain.parse_text(json.dumps({"type": "start", "words": True, "hotwords": {"Xiaozhi": 2, "lights": 1}}))
    assert start.words and start.hotwords == (("Xiaozhi", 2.0), ("lights", 1.0))
    listed = plain.parse_text(json.dumps({"type": "start", "hotwords": ["a b", "c"]}))
    assert listed.hotwords == (("a b", 1.5), ("c", 1.5))
    for bad in ({"type": "start", "words": "yes"}, {"type": "start", "hotwords": 5}):
        with pytest.raises(ProtocolError):
            plain.parse_text(json.dumps(bad))
    result = UtteranceResult(
        session_id="s", index=0, start_ms=1000, end_ms=1900, text="hi there", language="en", emotion=None,
        event=None, raw_text="hi there", speaker=SpeakerInfo(), models="test",
        words=(Word("hi", 1000, 1240, 0.91234), Word("there", 1300, 1800, 0.5)), confidence=0.68,
    )  # fmt: skip
    msg = json.loads(plain.render_result(result))
    assert msg["words"] == [{"text": "hi", "start_ms": 1000, "end_ms": 1240, "confidence": 0.912},
                            {"text": "there", "start_ms": 1300, "end_ms": 1800, "confidence": 0.5}]  # fmt: skip
    assert msg["confidence"] == 0.68
    assert json.loads(plain.render_result(replace(result, words=(), confidence=None)))["words"] == []


def test_ready_error_done():
    ready = json.loads(plain.render_ready("abc", plain.StartMessage(), "real", 200))
    assert ready == {"type": "ready", "session_id": "abc", "sample_rate": 16000, "models": "real", "vad_chunk_ms": 200}
    assert json.loads(plain.render_error("x", "y")) == {"type": "error", "code": "x", "message": "y"}
    assert json.loads(plain.render_done(2, 1)) == {"type": "done", "utterances": 2, "vad_replays": 1}

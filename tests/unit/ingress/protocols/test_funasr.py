import json

import pytest

from speech_serve.ingress.protocols import funasr
from speech_serve.ingress.protocols.parsing import ProtocolError
from speech_serve.messages import SpeakerInfo, UtteranceResult


def _result(text="hello world", speaker=None):
    return UtteranceResult(
        session_id="s", index=0, start_ms=100, end_ms=900, text=text, language="en", emotion=None, event=None,
        raw_text=text, speaker=speaker or SpeakerInfo(), models="test",
    )  # fmt: skip


def test_config_as_funasr_clients_send_it():
    text = json.dumps({
        "mode": "2pass", "chunk_size": [5, 10, 5], "chunk_interval": 10, "encoder_chunk_look_back": 4,
        "audio_fs": 8000, "wav_name": "meeting", "wav_format": "pcm", "is_speaking": True, "hotwords": "", "itn": False,
    })  # fmt: skip
    assert funasr.parse_text(text, configured=False) == funasr.Config("2pass", "meeting", 8000, "pcm", False, "")


def test_end_of_speech_old_and_new_clients():
    assert funasr.parse_text('{"is_speaking": false}', configured=True) == funasr.EndOfSpeech(False)
    assert funasr.parse_text('{"is_speaking": false, "is_end": true}', configured=True) == funasr.EndOfSpeech(True)


@pytest.mark.parametrize(
    "text, code",
    [
        ('{"mode": "batch"}', "bad_mode"),
        ('{"mode": "offline", "audio_fs": 11025}', "bad_sample_rate"),
        ('{"mode": "offline", "wav_format": "mp3"}', "unsupported_audio"),
        ("nope", "invalid_json"),
        ("[]", "bad_message"),
    ],
)
def test_bad_config(text, code):
    with pytest.raises(ProtocolError) as err:
        funasr.parse_text(text, configured=False)
    assert err.value.code == code


def test_text_delta():
    assert funasr.text_delta("", "hello") == "hello"
    assert funasr.text_delta("hello", "hello world") == " world"
    assert funasr.text_delta("hello", "help") is None  # revised: wait for the final


def test_answers_per_mode():
    for mode, online, final in (("2pass", "2pass-online", "2pass-offline"), ("offline", None, "offline")):
        config = funasr.Config(mode=mode, wav_name="w")
        msg = json.loads(funasr.render_final(config, _result()))
        assert (msg["mode"], msg["text"], msg["wav_name"], msg["is_final"]) == (final, "hello world", "w", False)
        assert json.loads(msg["timestamp"]) == [[100, 900]] and msg["spk_name"] == "unknown"
        if online:
            assert json.loads(funasr.render_interim(config, "hel"))["mode"] == online
    online = funasr.Config(mode="online")
    assert json.loads(funasr.render_final(online, _result(), online_sent="hello"))["text"] == " world"
    end = json.loads(funasr.render_end(funasr.Config(mode="2pass"), 2))
    assert end["is_final"] is True and end["is_end"] is True and end["mode"] == "2pass-offline"


def test_an_answer_says_why_no_speaker_was_matched_only_when_there_is_a_reason():
    config = funasr.Config(mode="offline")
    assert "spk_reason" not in json.loads(funasr.render_final(config, _result()))
    shed = json.loads(funasr.render_final(config, _result(speaker=SpeakerInfo(reason="shed"))))
    assert (shed["spk_name"], shed["spk_score"], shed["spk_reason"]) == ("unknown", None, "shed")


@pytest.mark.parametrize("field", ["wav_name", "wav_format", "hotwords", "speaker_group"])
@pytest.mark.parametrize("value", [["x" * 60000], {"a": "x" * 60000}, 7])
def test_a_field_that_is_not_a_string_is_refused_not_echoed(field, value):
    """wav_name is echoed in every answer: a list of 60,000 characters passed the bound on strings
    (it bounds top-level strings) and was str()ed into each result."""
    with pytest.raises(ProtocolError, match=f"{field}' must be a string") as raised:
        funasr.parse_text(json.dumps({"mode": "offline", field: value}), configured=False, max_string_chars=1024)
    assert raised.value.code == "bad_message" and len(str(raised.value)) < 100


def test_null_fields_take_their_defaults():
    config = funasr.parse_text(json.dumps({"mode": "2pass", "hotwords": None, "wav_name": None}), configured=False)
    assert (config.hotwords, config.wav_name, config.speaker_group) == ("", "demo", None)

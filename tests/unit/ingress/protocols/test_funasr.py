import asyncio
import json

import pytest

from speech_serve.ingress.protocols import funasr
from speech_serve.ingress.protocols.parsing import ProtocolError
from speech_serve.messages import SpeakerInfo, UtteranceResult
from speech_serve.settings import AppSettings
from speech_serve.wire.codes import CLOSE_TOO_BIG
from tests.support.fakes import MemoryWebSocket, QuietVad, binary, connection, text


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
    assert funasr.parse_text(text, configured=False) == funasr.Config("2pass", "meeting", 8000, "pcm", False, ())


def test_hotwords_as_funasr_clients_send_them_and_bad_ones_are_named():
    """funasr_wss_client.py sends its hotword file as a JSON object string, weights in tens; older
    clients a string of words. A bad list is an error frame (the session goes on), never a drop."""
    from speech_serve.ingress.protocols.parsing import ProtocolError
    from speech_serve.settings import LimitSettings

    def config(hotwords):
        return funasr.parse_text(json.dumps({"mode": "offline", "hotwords": hotwords}), configured=False)

    sent = json.dumps({"阿里巴巴": 20, "speech serve": 40})
    assert config(sent).hotwords == (("阿里巴巴", 1.0), ("speech serve", 2.0))
    assert config("alpha beta").hotwords == (("alpha", 1.5), ("beta", 1.5))  # limits.hotword_weight
    assert config(json.dumps({"loud": 1000})).hotwords == (("loud", 5.0),)  # cut to limits.max_hotword_weight
    for bad, says in [("{not json", "JSON"), (json.dumps({"x": -1}), "positive"), (json.dumps({"x" * 41: 20}), "40"),
                      (json.dumps({f"w{i}": 20 for i in range(101)}), "at most 100")]:  # fmt: skip
        with pytest.raises(ProtocolError) as err:
            config(bad)
        assert err.value.code == "bad_hotwords" and says in str(err.value)
    few = LimitSettings(max_hotwords=1)
    with pytest.raises(ProtocolError):
        funasr.parse_text(json.dumps({"mode": "offline", "hotwords": "a b"}), configured=False, limits=few)


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
    assert (config.hotwords, config.wav_name, config.speaker_group) == ((), "demo", None)


def run_file(frame_bytes: int) -> tuple[MemoryWebSocket, QuietVad]:
    """A FunASR session that sends its config, `frame_bytes` of PCM as ONE frame, and its end."""

    async def scenario():
        ws, vad, settings = MemoryWebSocket(), QuietVad(), AppSettings(stream={"vad_batch_interval_ms": 0})
        conn = connection(funasr.FunasrConnection, ws, settings, "s1", settings.funasr, vad=vad)
        session = asyncio.create_task(conn.run())
        for frame in [text({"mode": "offline"}), binary(bytes(frame_bytes)), text({"is_speaking": False})]:
            ws.inbox.put_nowait(frame)
        for _ in range(1000):  # a hang guard, not a speed bound
            if session.done() or any(m.get("is_end") for m in ws.sent):
                break
            await asyncio.sleep(0.01)
        ws.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(session, 10)
        return ws, vad

    return asyncio.run(scenario())


def test_a_whole_utterance_in_one_frame_is_taken_as_xiaozhi_servers_provider_sends_it():
    """xiaozhi-esp32-server's FunASR-server ASR provider sends each utterance as one binary frame; at
    limits.max_frame_bytes (2 s) every longer utterance was refused (tests/integration/
    test_xiaozhi_server_provider.py runs the provider itself)."""
    settings = AppSettings()
    assert settings.funasr.max_frame_bytes >= settings.stream.max_utterance_ms * 32  # 16 kHz PCM16: 32 bytes/ms
    utterance = 16000 * 2 * 10  # 10 s
    ws, vad = run_file(utterance)
    assert not [m for m in ws.sent if "error" in m] and ws.sent[-1]["is_final"] is True, ws.sent
    heard_ms = sum(len(item.chunk.pcm) for item in vad.items if item.chunk is not None) // 16
    assert heard_ms == 10_000  # every sample of the frame went to the VAD

    ws, _ = run_file(settings.funasr.max_frame_bytes + 2)
    assert [m.get("code") for m in ws.sent if "error" in m] == ["frame_too_large"] and ws.closed[0] == CLOSE_TOO_BIG

"""xiaozhi-esp32-server's own FunASR-server ASR provider (vendored unchanged, tests/vendor/xiaozhi_server/)
against the shared test service's FunASR endpoint, fed as that server feeds it: a device's Opus packets,
decoded per packet at its connection, cut into utterances by its VAD, each utterance's PCM sent by the
provider over a WebSocket of its own (tests/support/xiaozhi_server.py plays the server around it)."""

import asyncio
import logging
import re
import wave

import pytest

from speech_serve.wire.client import run_funasr
from speech_serve.wire.opus import encode_pcm
from tests.support.audio import TWO_UTTERANCES_SPEECH_MS, TWO_UTTERANCES_TEXT, TWO_UTTERANCES_WAV, read_pcm
from tests.support.service import TEST_DEVICE, as_device, device_token
from tests.support.xiaozhi_server import FixtureVad, provider_class, run_connection

pytestmark = pytest.mark.integration


def provider_config(service: str, output_dir: str) -> dict:
    """config.yaml's ASR.FunASRServer entry, pointed at this service (the keys fun_server.py reads)."""
    host, port = service.rsplit(":", 1)
    return {
        "type": "fun_server",
        "host": host,
        # The provider connects to ws://{host}:{port} and sends only `Authorization: Bearer; {api_key}`:
        # the port string is where our device id can ride, as a query parameter.
        "port": f"{port}/?device_id={TEST_DEVICE}",
        "is_ssl": False,  # its default is wss://; the service speaks ws:// (TLS is a proxy's)
        "api_key": device_token(TEST_DEVICE),
        "output_dir": output_dir,
    }


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def test_xiaozhi_servers_funasr_provider_gets_each_utterance_as_our_own_client_does(service, tmp_path, caplog):
    provider = provider_class()(provider_config(service, str(tmp_path)), True)  # as initialize_asr builds it
    packets = encode_pcm(read_pcm(TWO_UTTERANCES_WAV))  # 60 ms Opus packets, as a device sends them
    conn = asyncio.run(run_connection(provider, packets, FixtureVad(TWO_UTTERANCES_SPEECH_MS)))

    errors = [r.getMessage() for r in caplog.records if r.name == "xiaozhi_server" and r.levelno >= logging.ERROR]
    assert not errors, f"the provider logged errors (its text is then empty or cut short): {errors}"
    reports = conn.reports()  # (type, text, audio frames, time): one per utterance with text
    assert len(conn.chat_inputs) == len(reports) == 2, (
        f"expected one LLM input per utterance, got {conn.chat_inputs} (an utterance the service refused or "
        f"answered without text is dropped by the server without a word)"
    )
    utterances = zip(conn.chat_inputs, reports, TWO_UTTERANCES_SPEECH_MS, strict=True)
    for k, (text, report, (start, end)) in enumerate(utterances):
        pcm = b"".join(report[2])
        # The provider sends an utterance as ONE binary frame: each here is longer than its speech (> 2 s).
        assert len(pcm) // 32 >= end - start, f"utterance {k}: {len(pcm) // 32} ms of audio"
        # Reference: our own FunASR client on the same audio with the provider's settings (offline, no ITN);
        # the test models' text is meaningless but the same for the same audio.
        path = tmp_path / f"utterance{k}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(pcm)
        answers = run_funasr(f"ws://{service}/", str(path), mode="offline", itn=False, **as_device())
        expected = "".join(a["text"] for a in answers if not a.get("is_end")).strip()
        assert expected and text == expected, f"utterance {k}: the provider got {text!r}, our client {expected!r}"
        if answers[0]["models"] != "test":  # real models: the words the clip says
            assert words(text) == words(TWO_UTTERANCES_TEXT[k])

"""End to end on a real local Ray Serve (see conftest.py): the plain JSON protocol and the
OpenAI file endpoint. Replica loss (VADHost, SenseVoice, Speaker) is in test_faults_e2e.py."""

import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from speech_serve.wire.client import stream_file
from speech_serve.wire.tokens import device_headers
from tests.support.audio import TWO_UTTERANCES_SPEECH_MS, TWO_UTTERANCES_WAV
from tests.support.service import as_device

pytestmark = pytest.mark.integration


def test_healthz_reports_test_models_and_running_replicas(service):
    body = httpx.get(f"http://{service}/healthz", timeout=10).json()
    assert body["status"] == "ok"
    assert body["models"] == "test" and "RANDOM-WEIGHT" in body["warning"] and "transcripts" in body["warning"]
    assert set(body["deployments"]) == {"Ingress", "VADHost", "SenseVoice", "Speaker", "SessionRegistry"}
    assert body["deployments"]["VADHost"]["replicas"] == {"RUNNING": 2}


def test_websocket_stream_of_two_utterances_gives_two_results_in_order(service):
    results = stream_file(f"ws://{service}/v1/stream", str(TWO_UTTERANCES_WAV), **as_device())
    assert [r["type"] for r in results] == ["result", "result"]
    assert [r["index"] for r in results] == [0, 1]
    for r, (start, end) in zip(results, TWO_UTTERANCES_SPEECH_MS, strict=True):
        assert abs(r["start_ms"] - start) < 400 and abs(r["end_ms"] - end) < 400
        assert r["text"] and r["models"] == "test"
        assert r["speaker"]["label"] == "unknown" and r["speaker"]["embedding_id"].endswith(f":{r['index']}")
        for stage in ("asr_ms", "asr_model_ms", "speaker_ms", "vad_ms", "server_ms", "endpoint_ms"):
            assert r["latency_ms"][stage] >= 0
    assert len({r["session_id"] for r in results}) == 1


def test_concurrent_sessions_each_get_their_own_results(service):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        runs = list(
            pool.map(
                lambda _: stream_file(f"ws://{service}/v1/stream", str(TWO_UTTERANCES_WAV), **as_device()), range(4)
            )
        )
    assert [len(r) for r in runs] == [2, 2, 2, 2]
    assert len({r[0]["session_id"] for r in runs}) == 4


def test_bad_frames_get_errors_and_the_session_goes_on(service):
    with open(TWO_UTTERANCES_WAV, "rb") as f:
        pcm = f.read()[44:]
    with connect(f"ws://{service}/v1/stream", additional_headers=device_headers(**as_device()), max_size=None) as ws:
        json.loads(ws.recv(timeout=60))
        ws.send("this is not json")
        assert json.loads(ws.recv(timeout=60))["code"] == "invalid_json"
        ws.send(json.dumps({"type": "jump"}))
        assert json.loads(ws.recv(timeout=60))["code"] == "unknown_type"
        ws.send(b"\x01\x02\x03")  # odd length: not PCM16
        assert json.loads(ws.recv(timeout=60))["code"] == "bad_audio"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
        assert closed.value.rcvd.code == 1003
    with connect(f"ws://{service}/v1/stream", additional_headers=device_headers(**as_device()), max_size=None) as ws:
        json.loads(ws.recv(timeout=60))
        for i in range(0, len(pcm), 1920):
            ws.send(pcm[i : i + 1920])
        ws.send(json.dumps({"type": "start"}))
        assert next_error(ws)["code"] == "bad_order"
        ws.send(b"\x00" * 70_000)
        assert next_error(ws)["code"] == "frame_too_large"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=60)
        assert closed.value.rcvd.code == 1009


def next_error(ws) -> dict:
    """The next error frame; results of the audio sent so far may come first."""
    while (msg := json.loads(ws.recv(timeout=60)))["type"] != "error":
        assert msg["type"] == "result"
    return msg


def test_openai_transcriptions_endpoint(service):
    url = f"http://{service}/v1/audio/transcriptions"
    wav = TWO_UTTERANCES_WAV.read_bytes()
    device = device_headers(**as_device())
    verbose = httpx.post(
        url,
        headers=device,
        files={"file": ("a.wav", wav, "audio/wav")},
        data={"model": "x", "response_format": "verbose_json"},
        timeout=60,
    )
    assert verbose.status_code == 200, verbose.text
    body = verbose.json()
    assert body["duration"] == pytest.approx(8.17, abs=0.01) and body["models"] == "test"
    assert len(body["segments"]) == 2 and body["text"]
    plain_text = httpx.post(
        url, headers=device, files={"file": ("a.wav", wav)}, data={"response_format": "text"}, timeout=60
    )
    assert plain_text.headers["content-type"].startswith("text/plain") and plain_text.text.strip()
    assert httpx.post(url, headers=device, files={"file": ("a.wav", wav)}, timeout=60).json()["text"]
    bad_format = httpx.post(
        url, headers=device, files={"file": ("a.wav", wav)}, data={"response_format": "mp3"}, timeout=60
    )
    assert bad_format.status_code == 400 and "'mp3'" in bad_format.json()["detail"]
    assert "srt" in bad_format.json()["detail"]  # the formats it takes are named
    not_audio = httpx.post(url, headers=device, files={"file": ("a.wav", b"hello")}, timeout=60)
    assert not_audio.status_code == 400 and "decode" in not_audio.json()["detail"]

"""Devices and existing clients end to end on a real local Ray Serve (see conftest.py):
simulated Xiaozhi devices with real Opus frames and FunASR-protocol clients. Hostile input
beside a healthy session: test_hostile_sessions.py."""

import json
import time
import uuid
import wave

import numpy as np
import pytest
from scipy.signal import resample_poly
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from examples.xiaozhi_device import run_device, speech_windows
from speech_serve.wire.client import run_funasr
from speech_serve.wire.opus import encode_pcm
from speech_serve.wire.tokens import issue_token
from tests.support.audio import TWO_UTTERANCES_SPEECH_MS, TWO_UTTERANCES_WAV, read_pcm
from tests.support.service import (
    ALLOWED_DEVICE,
    SECRET,
    as_device,
    assert_two_utterances_in_order,
    device_token,
    haproxy_running,
    vad_live_sessions,
    xiaozhi_url,
)

pytestmark = pytest.mark.integration
WAV = str(TWO_UTTERANCES_WAV)


def test_frames_come_through_the_chosen_transport(service, transport):
    """HAProxy mode where its binary is (what `make serve` runs), Serve's Python proxy with
    SPEECH_SERVE_TEST_TRANSPORT=proxy: the tests of this run went through that one."""
    assert haproxy_running(transport) == bool(transport)


@pytest.mark.parametrize("version, mode", [(1, "auto"), (2, "realtime"), (3, "manual"), (1, "manual")])
def test_xiaozhi_device_gets_one_stt_per_utterance_in_order(service, version, mode):
    device, client = f"02:00:00:00:01:0{version}", str(uuid.uuid4())
    messages = run_device(
        xiaozhi_url(service), WAV, protocol_version=version, mode=mode, device_id=device, client_id=client,
        token=device_token(device, client), expect=2, linger_s=20,
    )  # fmt: skip
    stts = [m for m in messages if m["type"] == "stt"]
    assert [m["type"] for m in messages] == ["stt", "stt"], messages
    if mode == "manual":
        # push-to-talk sends audio only while the button is held: each utterance is its whole
        # window, and stream time skips the gaps between windows
        windows = speech_windows(read_pcm(TWO_UTTERANCES_WAV))
        assert [m["index"] for m in stts] == [0, 1] and all(m["text"] for m in stts)
        for m, (a, b) in zip(stts, windows, strict=True):
            assert abs((m["end_ms"] - m["start_ms"]) - (b - a) // 16) <= 60
    else:
        assert_two_utterances_in_order(stts)
    assert len({m["session_id"] for m in stts}) == 1 and stts[0]["models"] == "test"
    assert {"language", "emotion", "event", "speaker", "latency_ms"} <= set(stts[0])


def test_allow_listed_device_needs_no_token(service):
    messages = run_device(xiaozhi_url(service), WAV, device_id=ALLOWED_DEVICE, expect=2, linger_s=20)
    assert [m["type"] for m in messages] == ["stt", "stt"]


@pytest.mark.parametrize(
    "token",
    [None, "garbage", issue_token("wrong-secret", "c", "02:00:00:00:02:01"), issue_token(SECRET, "c", "someone-else")],
)
def test_bad_token_is_refused_before_any_session(service, token):
    deadline = time.monotonic() + 20
    while vad_live_sessions() and time.monotonic() < deadline:  # earlier tests' sessions are still being freed
        time.sleep(0.2)
    assert vad_live_sessions() == 0
    headers = {"Device-Id": "02:00:00:00:02:01", "Client-Id": "c", "Protocol-Version": "1"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with connect(xiaozhi_url(service), additional_headers=headers) as ws:
        error = json.loads(ws.recv(timeout=60))
        assert error["type"] == "error" and error["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            ws.send(json.dumps({"type": "hello", "audio_params": {"format": "opus"}}))
            ws.recv(timeout=60)
        assert closed.value.rcvd.code == 1008 and "unauthorized" in closed.value.rcvd.reason
    assert vad_live_sessions() == 0


def test_funasr_2pass_gives_interim_and_final_results_and_a_closing_is_final(service):
    messages = run_funasr(f"ws://{service}/", WAV, mode="2pass", realtime=True, **as_device())
    modes = [m["mode"] for m in messages]
    finals = [m for m in messages if m["mode"] == "2pass-offline" and not m.get("is_end")]
    assert len(finals) == 2 and all(m["text"] for m in finals)
    for k, final in enumerate(finals):  # at least one interim before each segment's final
        before = modes[: messages.index(final)]
        assert before.count("2pass-online") >= 1 and before.count("2pass-offline") == k
    for m, (start, end) in zip(finals, TWO_UTTERANCES_SPEECH_MS, strict=True):
        (seg,) = json.loads(m["timestamp"])
        assert abs(seg[0] - start) < 400 and abs(seg[1] - end) < 400
    assert messages[-1]["is_final"] is True and messages[-1]["is_end"] is True
    assert sum(m.get("is_final", False) for m in messages) == 1


def test_funasr_offline_mode_at_8khz_on_the_named_path(service, tmp_path):
    pcm8k = resample_poly(read_pcm(TWO_UTTERANCES_WAV).astype(np.float32), 1, 2).astype(np.int16)
    path = tmp_path / "8k.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000), w.writeframes(pcm8k.tobytes())
    messages = run_funasr(f"ws://{service}/funasr", str(path), mode="offline", **as_device())
    assert [m["mode"] for m in messages] == ["offline", "offline", "offline"]
    assert [m["is_final"] for m in messages] == [False, False, True]
    for m, (start, _end) in zip(messages[:2], TWO_UTTERANCES_SPEECH_MS, strict=True):
        assert abs(json.loads(m["timestamp"])[0][0] - start) < 400


def test_abort_drops_the_utterance_in_flight(service):
    """Abort just after the first utterance's speech, before the VAD's end-silence closes it:
    nothing is answered for it, and the second utterance still comes."""
    device, client = "02:00:00:00:05:01", str(uuid.uuid4())
    headers = {"Device-Id": device, "Client-Id": client, "Authorization": "Bearer " + device_token(device, client)}
    packets = encode_pcm(read_pcm(TWO_UTTERANCES_WAV))
    abort_at = TWO_UTTERANCES_SPEECH_MS[0][1] // 60 + 1  # the first 60 ms packet after the speech
    with connect(xiaozhi_url(service), additional_headers=headers) as ws:
        ws.send(json.dumps({"type": "hello", "audio_params": {"format": "opus"}}))
        session_id = json.loads(ws.recv(timeout=60))["session_id"]
        ws.send(json.dumps({"session_id": session_id, "type": "listen", "state": "start", "mode": "auto"}))
        for packet in packets[:abort_at]:
            ws.send(packet)
        ws.send(json.dumps({"session_id": session_id, "type": "abort", "reason": "wake_word_detected"}))
        for packet in packets[abort_at:]:
            ws.send(packet)
        # Results come in utterance order, so the first stt tells: had the aborted utterance
        # been answered, it would come first. (The wait is a hang guard, not a speed bound.)
        messages = [json.loads(ws.recv(timeout=120))]
        with pytest.raises(TimeoutError):  # and nothing after it (best effort: a late extra would fail)
            while True:
                messages.append(json.loads(ws.recv(timeout=3)))
    assert [m["type"] for m in messages] == ["stt"]
    assert abs(messages[0]["start_ms"] - TWO_UTTERANCES_SPEECH_MS[1][0]) < 400


def assert_words_inside(result: dict, words: list) -> None:
    """Words in session time, in order, inside their utterance (a frame of slack at its end)."""
    assert words, result
    starts = [w["start_ms"] for w in words]
    assert starts == sorted(starts) and all(w["start_ms"] < w["end_ms"] for w in words)
    assert result["start_ms"] <= starts[0] and words[-1]["end_ms"] <= result["end_ms"] + 60


def test_plain_results_carry_word_times_and_confidences_with_hotwords_or_without(service):
    from speech_serve.wire.client import stream_file

    for hotwords in (None, {"w100 w200": 3.0, "Xiaozhi": 1.0}):
        results = stream_file(f"ws://{service}/v1/stream", WAV, words=True, hotwords=hotwords, **as_device())
        assert [r["index"] for r in results] == [0, 1]
        for r in results:  # the tiny model's flat posteriors put any hotword within its bonus
            assert ("w100 w200" in r["text"]) == bool(hotwords)
            assert_words_inside(r, r["words"])
            assert all(0 <= w["confidence"] <= 1 for w in r["words"]) and 0 <= r["confidence"] <= 1  # 3 decimals
    plain = stream_file(f"ws://{service}/v1/stream", WAV, **as_device())
    assert all("words" not in r for r in plain)  # nothing asked, nothing decoded twice


def test_a_xiaozhi_hello_with_hotwords_and_words_gets_them_in_every_stt(service):
    device, client = "02:00:00:00:01:07", str(uuid.uuid4())
    messages = run_device(xiaozhi_url(service), WAV, device_id=device, client_id=client, expect=2, linger_s=20,
                          token=device_token(device, client), hotwords={"w100 w200": 3}, words=True)  # fmt: skip
    assert [m["type"] for m in messages] == ["stt", "stt"], messages
    for m in messages:  # the tiny model's flat posteriors put any hotword within its bonus
        assert "w100 w200" in m["text"] and [w["text"] for w in m["words"]] == m["text"].split()
        assert_words_inside(m, m["words"])
        assert 0 <= m["confidence"] <= 1


def test_funasr_hotwords_as_its_own_client_sends_them_give_word_timestamps(service):
    hotwords = json.dumps({"阿里巴巴": 20, "w100 w200": 60})  # funasr_wss_client.py's JSON: 60 is 3 per token
    messages = run_funasr(f"ws://{service}/", WAV, mode="offline", hotwords=hotwords, **as_device())
    finals = [m for m in messages if not m.get("is_end")]
    assert len(finals) == 2 and not any("error" in m for m in messages)
    assert all("w100 w200" in m["text"] for m in finals)
    for m, (start, end) in zip(finals, TWO_UTTERANCES_SPEECH_MS, strict=True):
        spans = json.loads(m["timestamp"])  # [[start_ms, end_ms], ...] per word, as FunASR's server
        assert len(spans) >= 1 and all(a < b for a, b in spans)
        assert abs(spans[0][0] - start) < 600 and spans[-1][1] <= end + 600
    bad = run_funasr(f"ws://{service}/", WAV, mode="offline", hotwords="{not json", **as_device())
    assert bad[0]["code"] == "bad_hotwords" and bad[-1]["is_end"]  # told, and the file still transcribed

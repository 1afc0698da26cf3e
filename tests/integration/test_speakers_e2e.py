"""Who spoke, end to end on a real local Ray Serve (see conftest.py) with real GE2E weights:
enrol two espeak-ng voices over HTTP, stream a recording of them and a third voice through
each protocol, and get the right name for each and `unknown` for the third.

tests/fixtures/voices/make_voices.sh makes the audio: alice = en-us+f2, bob = en-us,
carol (never enrolled) = en-us+klatt; three_speakers.wav is alice, bob, carol in turn.
"""

import json
import time
import uuid

import httpx
import pytest
from ray import serve
from websockets.sync.client import connect

from examples.xiaozhi_device import run_device
from speech_serve.app import run_local
from speech_serve.ingress.auth import own_group
from speech_serve.wire.client import run_funasr, stream_file
from speech_serve.wire.tokens import device_headers
from tests.support.audio import FIXTURES
from tests.support.service import ADMIN, ALLOWED_DEVICE, APP, TEST_GROUP, as_device, wait_healthy

pytestmark = pytest.mark.integration
VOICES = FIXTURES / "voices"
THREE = str(VOICES / "three_speakers.wav")
GROUP = TEST_GROUP  # with device auth on, a device is matched in its own (mapped) group only


def enroll(service: str, name: str, group: str, files: list[str]) -> httpx.Response:
    uploads = [("files", (f, (VOICES / f).read_bytes(), "audio/wav")) for f in files]
    return httpx.post(
        f"http://{service}/v1/speakers", headers=ADMIN, data={"name": name, "group": group}, files=uploads, timeout=60
    )


@pytest.fixture(scope="module")
def enrolled(service) -> dict[str, dict]:
    out = {}
    for name in ("alice", "bob"):
        r = enroll(service, name, GROUP, [f"{name}_enroll_1.wav", f"{name}_enroll_2.wav"])
        assert r.status_code == 201, r.text
        out[name] = r.json()
    time.sleep(1.5)  # Speaker replicas look for new enrolments every refresh_s (1 s)
    return out


def test_enrolment_records_model_and_embeddings(enrolled):
    alice = enrolled["alice"]
    assert (alice["name"], alice["group"], alice["model"], alice["dim"], alice["embeddings"]) == (
        "alice", GROUP, "ge2e", 256, 2,
    )  # fmt: skip


def test_plain_stream_names_each_enrolled_speaker_and_not_the_stranger(service, enrolled):
    results = stream_file(f"ws://{service}/v1/stream", THREE, speaker_group=GROUP, **as_device())
    speakers = [r["speaker"] for r in results]
    assert [s["label"] for s in speakers] == ["alice", "bob", "unknown"], speakers
    assert speakers[0]["speaker_id"] == enrolled["alice"]["id"] and speakers[0]["score"] >= 0.82
    assert speakers[2]["score"] is None and speakers[2]["speaker_id"] is None  # no score for `unknown`


def test_a_client_cannot_pick_another_households_voiceprints(service, enrolled):
    """With device auth on, a plain or FunASR client naming another group is refused that group and
    matched in its own: here ALLOWED_DEVICE, whose own group holds no alice or bob."""
    results = stream_file(f"ws://{service}/v1/stream", THREE, speaker_group=GROUP, device_id=ALLOWED_DEVICE)
    assert [r["speaker"]["label"] for r in results] == ["unknown"] * 3
    messages = run_funasr(f"ws://{service}/", THREE, mode="offline", speaker_group=GROUP, device_id=ALLOWED_DEVICE)
    assert [m["spk_name"] for m in messages if not m["is_final"] and "spk_name" in m] == ["unknown"] * 3


def test_funasr_answers_carry_spk_name(service, enrolled):
    messages = run_funasr(f"ws://{service}/", THREE, mode="offline", speaker_group=GROUP, **as_device())
    assert [m["spk_name"] for m in messages if not m["is_final"]] == ["alice", "bob", "unknown"]


def test_xiaozhi_device_matches_its_own_household_only(service, enrolled):
    """An unmapped device's group is its own (`device:<id>`): bob enrolled elsewhere is a stranger here."""
    r = enroll(service, "alice", own_group(ALLOWED_DEVICE), ["alice_enroll_1.wav", "alice_enroll_2.wav"])
    assert r.status_code == 201
    time.sleep(1.5)
    messages = run_device(f"ws://{service}/xiaozhi/v1/", THREE, device_id=ALLOWED_DEVICE, expect=3, linger_s=20)
    assert [m["speaker"]["label"] for m in messages if m["type"] == "stt"] == ["alice", "unknown", "unknown"]
    assert httpx.delete(f"http://{service}/v1/speakers/{r.json()['id']}", headers=ADMIN, timeout=10).status_code == 204


def test_enrol_from_a_live_session(service, enrolled):
    group = "live-" + uuid.uuid4().hex[:6]
    pcm = (VOICES / "bob_enroll_1.wav").read_bytes()[44:] + b"\x00" * 32000 * 2
    with connect(f"ws://{service}/v1/stream", additional_headers=device_headers(**as_device())) as ws:
        session_id = json.loads(ws.recv(timeout=60))["session_id"]
        for i in range(0, len(pcm), 1920):
            ws.send(pcm[i : i + 1920])
        assert json.loads(ws.recv(timeout=60))["type"] == "result"  # one finished utterance
        r = httpx.post(
            f"http://{service}/v1/speakers/from-session",
            json={"name": "bob-live", "session_id": session_id, "last_n": 3, "group": group},
            headers=ADMIN,
            timeout=30,
        )
    assert r.status_code == 201, r.text
    assert (r.json()["embeddings"], r.json()["group"], r.json()["model"]) == (1, group, "ge2e")
    missing = httpx.post(
        f"http://{service}/v1/speakers/from-session", json={"name": "x", "session_id": "nope"}, headers=ADMIN
    )
    assert missing.status_code == 404


def test_speaker_management_and_bad_requests(service, enrolled):
    base = f"http://{service}/v1/speakers"
    listed = httpx.get(base, params={"group": GROUP}, headers=ADMIN, timeout=10).json()["speakers"]
    assert sorted(v["name"] for v in listed) == ["alice", "bob"]
    bob_id = enrolled["bob"]["id"]
    assert (
        httpx.patch(f"{base}/{bob_id}", json={"name": "Robert"}, headers=ADMIN, timeout=10).json()["name"] == "Robert"
    )
    files = [("files", ("b.wav", (VOICES / "bob_enroll_2.wav").read_bytes(), "audio/wav"))]
    reenrolled = httpx.put(f"{base}/{bob_id}/embeddings", files=files, headers=ADMIN, timeout=60)
    assert reenrolled.status_code == 200 and reenrolled.json()["embeddings"] == 1
    assert httpx.patch(f"{base}/{bob_id}", json={"name": "bob"}, headers=ADMIN, timeout=10).status_code == 200
    bob_wav = (VOICES / "bob_enroll_1.wav").read_bytes()
    bad = {
        "not audio": enroll_raw(service, {"name": "x"}, [("files", ("x.wav", b"hello", "audio/wav"))]),
        "too short": enroll_raw(service, {"name": "x"}, [("files", ("s.wav", bob_wav[:8000], "audio/wav"))]),
        "no name": enroll_raw(service, {}, [("files", ("b.wav", bob_wav, "audio/wav"))]),
        "no files": enroll_raw(service, {"name": "x"}, []),
    }  # fmt: skip
    assert {k: r.status_code for k, r in bad.items()} == {
        "not audio": 400,
        "too short": 400,
        "no name": 422,
        "no files": 422,
    }
    assert "cannot decode" in bad["not audio"].json()["detail"] and "at least" in bad["too short"].json()["detail"]
    assert httpx.get(f"{base}/nope", headers=ADMIN, timeout=10).status_code == 404
    assert httpx.delete(f"{base}/nope", headers=ADMIN, timeout=10).status_code == 404
    assert httpx.patch(f"{base}/{bob_id}", json={"name": ""}, headers=ADMIN, timeout=10).status_code == 422


def enroll_raw(service: str, data: dict, files: list) -> httpx.Response:
    return httpx.post(f"http://{service}/v1/speakers", data=data, files=files or None, headers=ADMIN, timeout=60)


def test_voiceprints_survive_a_restart_of_the_service(service, service_args, enrolled):
    """Last in the module: the application is deleted and deployed again from scratch."""
    serve.delete(APP)
    port = int(service.rsplit(":", 1)[1])
    base = run_local(service_args, port, name=APP)
    wait_healthy(f"http://{base}/healthz")
    listed = httpx.get(f"http://{base}/v1/speakers", params={"group": GROUP}, headers=ADMIN, timeout=10).json()[
        "speakers"
    ]
    assert sorted(v["name"] for v in listed) == ["alice", "bob"]
    results = stream_file(f"ws://{base}/v1/stream", THREE, speaker_group=GROUP, **as_device())
    assert [r["speaker"]["label"] for r in results] == ["alice", "bob", "unknown"]


def realtime_speakers(service: str, device_id: str, token: str | None) -> list[str]:
    """THREE streamed over the Realtime protocol (24 kHz appends, server VAD) as `device_id`: the
    speaker label of each completed transcript."""
    import base64

    import numpy as np
    import soxr

    from tests.support.audio import read_pcm

    pcm = soxr.resample(read_pcm(THREE), 16000, 24000).astype("<i2")
    pcm = np.concatenate([pcm, np.zeros(24000 * 2, dtype="<i2")])  # the last utterance's end silence
    headers = device_headers(device_id, token)
    labels = []
    with connect(f"ws://{service}/v1/realtime?intent=transcription", additional_headers=headers) as ws:
        assert json.loads(ws.recv(timeout=60))["type"] == "session.created"
        step = 24000 // 5  # 200 ms appends
        for i in range(0, len(pcm), step):
            ws.send(json.dumps({"type": "input_audio_buffer.append",
                                "audio": base64.b64encode(pcm[i : i + step].tobytes()).decode()}))  # fmt: skip
        while len(labels) < 3:
            message = json.loads(ws.recv(timeout=120))
            if message["type"] == "conversation.item.input_audio_transcription.completed":
                labels.append(message["speech_serve"]["speaker"]["label"])
    return labels


def test_realtime_sessions_are_matched_in_their_devices_household_only(service, enrolled):
    """With device auth on, a Realtime session's group is its device's: TEST_DEVICE's household
    names alice and bob; ALLOWED_DEVICE (a group of its own) hears strangers."""
    assert realtime_speakers(service, **as_device()) == ["alice", "bob", "unknown"]
    assert realtime_speakers(service, ALLOWED_DEVICE, None) == ["unknown"] * 3


def test_uploads_are_matched_in_their_devices_household_only(service, enrolled):
    def speakers(headers: dict) -> list[str]:
        r = httpx.post(f"http://{service}/v1/audio/transcriptions", headers=headers, timeout=120,
                       data={"response_format": "verbose_json"},
                       files={"file": ("three.wav", open(THREE, "rb").read(), "audio/wav")})  # fmt: skip
        assert r.status_code == 200, r.text
        return [s["speaker"]["label"] for s in r.json()["segments"]]

    household = device_headers(as_device()["device_id"], as_device()["token"])
    assert speakers(household) == ["alice", "bob", "unknown"]
    assert speakers(device_headers(ALLOWED_DEVICE, None)) == ["unknown"] * 3

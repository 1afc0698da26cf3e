"""Security end to end on the real local Ray Serve (see conftest.py): device authentication on
every device path, the admin token, no credential in any log file, no upload on disk."""

import io
import json
import os
import tempfile
import time
import uuid
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from speech_serve.ingress.auth import device_auth_required, serve_bind_host
from speech_serve.wire.client import stream_file
from speech_serve.wire.tokens import device_headers, issue_token, url_with_token
from tests.support.audio import TWO_UTTERANCES_WAV, read_pcm
from tests.support.service import ADMIN, ADMIN_TOKEN, APP, SECRET, as_device, device_token, vad_live_sessions

pytestmark = pytest.mark.integration
BAD_TOKEN = issue_token("not-the-secret", "", "02:00:00:00:09:01")


def test_the_replica_learns_the_bind_host_from_serve(service):
    """The test service binds 127.0.0.1 (run_local) and forces auth on: the ingress says it
    learned that host, and the same lookup here would have turned auto off."""
    body = httpx.get(f"http://{service}/healthz", timeout=10).json()
    assert body["device_auth"] == {"enabled": True, "why": "security.device_auth: on (Serve binds 127.0.0.1)"}
    assert body["admin_api"] == "enabled"
    host = serve_bind_host(timeout_s=10)
    assert host == "127.0.0.1" and device_auth_required("auto", host)[0] is False


def refused(ws) -> tuple[dict, int, str]:
    """The error frame and close code/reason of a refused connection."""
    error = json.loads(ws.recv(timeout=60))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=60)
    return error, closed.value.rcvd.code, closed.value.rcvd.reason


@pytest.mark.parametrize(
    "how",
    ["nothing", "no device id", "token of another device", "wrong secret", "garbage", "token in query, wrong"],
)
def test_plain_stream_refuses_bad_credentials_before_any_session(service, how):
    device = "02:00:00:00:09:02"
    url, headers = f"ws://{service}/v1/stream", {}
    if how == "no device id":
        headers = {"Authorization": f"Bearer {device_token(device)}"}
    elif how == "token of another device":
        headers = device_headers(device, device_token("02:00:00:00:09:99"))
    elif how == "wrong secret":
        headers = device_headers(device, issue_token("nope", "", device))
    elif how == "garbage":
        headers = device_headers(device, "garbage")
    elif how == "token in query, wrong":
        url = url_with_token(url, device, BAD_TOKEN)
    with connect(url, additional_headers=headers) as ws:
        error, code, reason = refused(ws)
    assert error["type"] == "error" and error["code"] == "unauthorized" and error["message"]
    assert code == 1008 and reason.startswith("unauthorized")
    assert vad_live_sessions() == 0


def test_plain_stream_takes_the_token_as_a_query_parameter(service):
    results = stream_file(url_with_token(f"ws://{service}/v1/stream", **as_device()), str(TWO_UTTERANCES_WAV))
    assert [r["index"] for r in results] == [0, 1]


def test_funasr_refuses_without_a_token_in_its_own_error_shape(service):
    for path in ("/", "/funasr"):
        with connect(f"ws://{service}{path}", subprotocols=["binary"]) as ws:
            assert ws.subprotocol == "binary"
            error, code, _ = refused(ws)
        assert error["code"] == "unauthorized" and "missing device id" in error["error"] and error["is_final"] is False
        assert code == 1008


def test_file_uploads_are_a_device_path(service):
    url = f"http://{service}/v1/audio/transcriptions"
    files = {"file": ("a.wav", TWO_UTTERANCES_WAV.read_bytes(), "audio/wav")}
    none = httpx.post(url, files=files, timeout=60)
    assert none.status_code == 401 and none.headers["www-authenticate"] == "Bearer"
    assert "missing device id" in none.json()["detail"]
    wrong = httpx.post(url, files=files, headers=device_headers("02:00:00:00:09:03", BAD_TOKEN), timeout=60)
    assert wrong.status_code == 403 and wrong.json()["detail"] == "invalid token"
    by_query = httpx.post(url_with_token(url, **as_device()), files=files, timeout=60)
    assert by_query.status_code == 200 and by_query.json()["text"]


def test_admin_api_needs_the_admin_token(service):
    base = f"http://{service}/v1/speakers"
    calls = {
        "list": lambda h: httpx.get(base, headers=h, timeout=10),
        "get": lambda h: httpx.get(f"{base}/nope", headers=h, timeout=10),
        "rename, bad body": lambda h: httpx.patch(f"{base}/nope", content=b"{not json", headers=h, timeout=10),
        "from-session": lambda h: httpx.post(f"{base}/from-session", json={}, headers=h, timeout=10),
        "delete": lambda h: httpx.delete(f"{base}/nope", headers=h, timeout=10),
        "enrol": lambda h: httpx.post(base, data={"name": "x"}, headers=h, timeout=10),
    }
    statuses = {
        name: (call({}).status_code, call({"Authorization": "Bearer wrong"}).status_code, call(ADMIN).status_code)
        for name, call in calls.items()
    }
    assert statuses == {
        "list": (401, 403, 200),
        "get": (401, 403, 404),
        "rename, bad body": (401, 403, 422),  # the body is looked at only after the token
        "from-session": (401, 403, 422),
        "delete": (401, 403, 404),
        "enrol": (401, 403, 422),
    }
    missing = httpx.get(base, timeout=10)
    assert missing.headers["www-authenticate"] == "Bearer" and "admin token" in missing.json()["detail"]
    device_token_is_not_admin = httpx.get(base, headers=device_headers(**as_device()), timeout=10)
    assert device_token_is_not_admin.status_code == 403
    assert httpx.get(f"http://{service}/healthz", timeout=10).status_code == 200  # open


def _log_files() -> list[Path]:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return [p for p in logs.rglob("*") if p.is_file()]


def test_no_credential_reaches_any_log_file(service):
    """Connect with credentials in every place they can travel (query, header; accepted and
    refused; device and admin), then read every log file of this Ray session."""
    device = "02:00:00:00:0a:" + uuid.uuid4().hex[:2]
    good = device_token(device)
    bad_query = issue_token("not-the-secret", "", device)
    bad_header = issue_token("also-not-the-secret", "", device)
    with connect(url_with_token(f"ws://{service}/v1/stream", device, bad_query)) as ws:
        refused(ws)
    with connect(f"ws://{service}/funasr", additional_headers=device_headers(device, bad_header)) as ws:
        refused(ws)
    assert stream_file(url_with_token(f"ws://{service}/v1/stream", device, good), str(TWO_UTTERANCES_WAV))
    httpx.get(f"http://{service}/v1/speakers", headers={"Authorization": "Bearer wrong-admin-token"}, timeout=10)
    httpx.get(f"http://{service}/v1/speakers", headers=ADMIN, timeout=10)
    httpx.post(
        url_with_token(f"http://{service}/v1/audio/transcriptions", device, bad_query),
        files={"file": ("a.wav", b"RIFF")},
        timeout=10,
    )
    refusal = f"refused /v1/stream?device_id={device.replace(':', '%3A')}&token="
    deadline = time.monotonic() + 20
    while True:  # the refusal line shows the logs were written, and where a token would be
        texts = {p: p.read_bytes().decode("utf-8", "replace") for p in _log_files()}
        if any(refusal in t for t in texts.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    secrets = {"device token": good, "refused query token": bad_query, "refused header token": bad_header,
               "admin token": ADMIN_TOKEN, "device secret": SECRET}  # fmt: skip
    leaks = {what: [p.name for p, t in texts.items() if value in t] for what, value in secrets.items()}
    assert leaks == {what: [] for what in secrets}
    assert any(f"{refusal}[REDACTED]: invalid token" in t for t in texts.values()), "the refusal was not logged"


def _ingress_pid() -> int:
    (name,) = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("SERVE_REPLICA::") and f"{APP}#Ingress#" in a["name"]
    ]
    actor = ray.get_actor(name, namespace="serve")
    return ray._private.state.actors(actor._actor_id.hex())["Pid"]


def _temp_files_open(pid: int) -> set[str]:
    """Files the process holds open in the temp dir (outside Ray's own session files)."""
    tmp, ray_dir = tempfile.gettempdir(), str(Path(ray._private.worker._global_node.get_session_dir_path()).parent)
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(tmp + "/") and not target.startswith(ray_dir):
            found.add(target)
    return found


def test_an_upload_over_the_spool_threshold_never_reaches_the_disk(service):
    """3 MiB of audio, sent slowly: once more than 1 MiB (Starlette's spool threshold) is in,
    the ingress replica's open files are looked at after every piece. Starlette's own parser
    would hold a temporary file (`/tmp/#123 (deleted)`) by then."""
    pcm = read_pcm(TWO_UTTERANCES_WAV)
    audio = np.concatenate([pcm, np.zeros(16000 * 100 - len(pcm), dtype=np.int16)])  # 100 s: 3.2 MB
    wav = io.BytesIO()
    with wave.open(wav, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000), w.writeframes(audio.tobytes())
    boundary = "b" + uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="long.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + wav.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    assert len(body) > 3 * 1024 * 1024
    pid = _ingress_pid()
    before = _temp_files_open(pid)
    seen: set[str] = set()
    checks = 0
    piece = 256 * 1024

    def slowly():
        nonlocal checks
        for i in range(0, len(body), piece):
            yield body[i : i + piece]
            if i + piece > 1024 * 1024:
                time.sleep(0.3)  # let the replica take in what was sent
                seen.update(_temp_files_open(pid) - before)
                checks += 1

    headers = {**device_headers(**as_device()), "Content-Type": f"multipart/form-data; boundary={boundary}"}
    r = httpx.post(f"http://{service}/v1/audio/transcriptions", content=slowly(), headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["text"] and checks >= 8
    assert seen == set()

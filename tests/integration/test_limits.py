"""Admission on the real service: over the overall session cap, or over a device's connection
limit, a client is refused at once with a reason and a close code; nothing waits in a queue,
and a freed slot is usable again."""

import json
import time

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from speech_serve.wire.tokens import device_headers
from tests.support.service import ALLOWED_DEVICE, DEVICE_CONNECTIONS_CAP, SESSIONS_CAP, as_device, wait_admission_clean

pytestmark = pytest.mark.integration


def _open_plain(service: str, n: int):
    """Device n of the plain protocol (its own device id, so only the overall cap applies)."""
    headers = device_headers(**as_device(f"02:00:00:00:10:{n:02x}"))
    ws = connect(f"ws://{service}/v1/stream", additional_headers=headers, open_timeout=30)
    return ws, json.loads(ws.recv(timeout=60))


def _refusal(ws) -> tuple[dict, int]:
    """The error frame and close code of a refused connection."""
    frame = None
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            frame = json.loads(ws.recv(timeout=60))
    return frame, closed.value.rcvd.code


def test_sessions_over_the_overall_cap_are_refused_at_once(service):
    admitted = []
    try:
        for n in range(SESSIONS_CAP):
            ws, first = _open_plain(service, n)
            admitted.append(ws)
            assert first["type"] == "ready", first
        started = time.monotonic()
        ws, first = _open_plain(service, SESSIONS_CAP)
        refused_after_s = time.monotonic() - started
        admitted.append(ws)  # closed below even if it was wrongly admitted
        assert first["type"] == "error" and first["code"] == "server_busy", first
        assert f"maximum of {SESSIONS_CAP}" in first["message"]
        _, code = _refusal(ws)
        assert code == 1013
        print(f"\nrefused in {refused_after_s * 1000:.0f} ms with {SESSIONS_CAP} sessions open")
    finally:
        for ws in admitted:
            ws.close()
    wait_admission_clean(service)  # the releases reach the registry (however slowly this machine runs)
    ws, first = _open_plain(service, SESSIONS_CAP + 1)
    ws.close()
    assert first["type"] == "ready"  # the slots were given back


def _xiaozhi(service: str, device: str):
    headers = {"Device-Id": device, "Client-Id": "limits-test", "Protocol-Version": "1"}
    return connect(f"ws://{service}/xiaozhi/v1/", additional_headers=headers, open_timeout=30)


def test_a_device_over_its_connection_limit_is_refused_with_1008(service):
    open_now = [_xiaozhi(service, ALLOWED_DEVICE) for _ in range(DEVICE_CONNECTIONS_CAP)]
    try:
        for ws in open_now:  # all admitted: they answer hello
            ws.send(json.dumps({"type": "hello", "version": 1, "transport": "websocket",
                                "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1,
                                                 "frame_duration": 60}}))  # fmt: skip
            assert json.loads(ws.recv(timeout=60))["type"] == "hello"
        one_more = _xiaozhi(service, ALLOWED_DEVICE)
        frame, code = _refusal(one_more)
        assert frame["type"] == "error" and frame["code"] == "too_many_connections", frame
        assert ALLOWED_DEVICE in frame["message"] and code == 1008
    finally:
        for ws in open_now:
            ws.close()

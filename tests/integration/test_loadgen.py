"""The load tool in CI, sized so that any machine carries it: the test service admits 24
sessions; quiet connections hold all but 3 slots, then the load tool offers 6 devices (all three
protocols). What must hold at any speed is asserted: the 3 over the cap are refused at connect
(close 1013), the admitted lose nothing and get no error frame within a generous deadline, and
their slots are free once they have gone. (Latency and capacity are machine figures: the
capacity sweep and docs/benchmarks.md measure those, not a test.)"""

import asyncio
import contextlib
import json
import time

import pytest
from websockets.asyncio.client import connect

from speech_serve.loadtest.loadgen import run_load
from speech_serve.loadtest.records import LoadConfig
from speech_serve.loadtest.report import write_report
from speech_serve.wire.tokens import device_headers
from tests.support.service import SECRET, SESSIONS_CAP, admission_state, device_token

pytestmark = pytest.mark.integration

STREAMING = 3  # devices admitted to stream: one per protocol, little work on any machine
OVER = 3  # offered beyond the cap
GRACE_S = 180.0  # how long the admitted wait for their last results: a hang guard, not a speed bound


async def hold_quiet_sessions(base: str, n: int, stack: contextlib.AsyncExitStack) -> None:
    """n plain-protocol sessions that say nothing: each holds one admission slot."""
    for i in range(n):
        device = f"02:20:00:00:{i >> 8 & 255:02x}:{i & 255:02x}"
        ws = await stack.enter_async_context(
            connect(f"ws://{base}/v1/stream", additional_headers=device_headers(device, device_token(device)),
                    open_timeout=60)  # fmt: skip
        )
        ready = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert ready["type"] == "ready", ready


def wait_for_registry(base: str, sessions: int, timeout_s: float = 90) -> int:
    deadline = time.monotonic() + timeout_s
    while (live := admission_state(base)["registry_sessions"]) != sessions and time.monotonic() < deadline:
        time.sleep(0.5)
    return live


def test_devices_over_the_cap_are_refused_and_the_admitted_lose_nothing(service, tmp_path):
    quiet = SESSIONS_CAP - STREAMING
    cfg = LoadConfig(
        url=f"ws://{service}", protocol="mix", clients=STREAMING + OVER, ramp_step=STREAMING, ramp_every_s=2,
        duration_s=15, grace_s=GRACE_S, auth_secret=SECRET, out=str(tmp_path / "report"),
        serve_api="http://127.0.0.1:1",  # no dashboard: replica counts from /healthz
    )  # fmt: skip

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            await hold_quiet_sessions(service, quiet, stack)
            state = await run_load(cfg)
            # The streaming devices have gone: only the quiet sessions may hold slots now.
            return state, await asyncio.to_thread(wait_for_registry, service, quiet)

    state, live_after = asyncio.run(scenario())
    summary = write_report(cfg, state)
    assert summary["devices_connected"] == STREAMING + OVER and summary["connection_errors"] == 0, \
        state.connection_errors  # fmt: skip
    assert summary["refused"] == OVER and set(state.refused) == {"server_busy"}, state.refused
    assert live_after == quiet, f"the load devices left {live_after - quiet} slot(s) held"
    assert summary["utterances_sent"] >= 2 * STREAMING
    assert summary["lost"] == 0 and summary["duplicated"] == 0 and summary["error_frames"] == 0, state.unexpected
    assert summary["latency_s"]["p95"] is not None and summary["first_interim_from_speech_start_s"] is not None
    assert summary["max_replicas"]["VADHost"] >= 1  # the replica timeline came from /healthz
    for name in ("report.md", "raw.json", "latency_vs_sessions.png", "replicas_over_time.png", "latency_histogram.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    raw = json.loads((tmp_path / "report" / "raw.json").read_text())
    assert len(raw["utterances"]) == summary["utterances_sent"] and "auth_secret" not in raw["config"]

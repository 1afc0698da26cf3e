"""The load tool in CI: 28 simulated devices (all three protocols) for a short run against the
test service, which admits 24 sessions: the 4 over the cap are refused at connect (close 1013),
and of the admitted ones nothing may be lost or duplicated and no connection may fail. (A
latency threshold would only measure this machine's noise; the README's recorded runs do that.)"""

import asyncio
import json

import pytest

from loadtest.loadgen import LoadConfig, run_load
from loadtest.report import write_report
from tests.integration.conftest import SECRET, SESSIONS_CAP

pytestmark = pytest.mark.integration


def test_devices_over_the_cap_are_refused_and_the_admitted_lose_nothing(service, tmp_path):
    offered = SESSIONS_CAP + 4
    cfg = LoadConfig(
        url=f"ws://{service}", protocol="mix", clients=offered, ramp_step=10, ramp_every_s=2, duration_s=15,
        auth_secret=SECRET, out=str(tmp_path / "report"), serve_api="http://127.0.0.1:1",  # no dashboard: /healthz
    )  # fmt: skip
    state = asyncio.run(run_load(cfg))
    summary = write_report(cfg, state)
    assert summary["devices_connected"] == offered and summary["connection_errors"] == 0, state.connection_errors
    assert summary["refused"] == offered - SESSIONS_CAP, state.refused
    assert summary["utterances_sent"] >= 2 * SESSIONS_CAP
    assert summary["lost"] == 0 and summary["duplicated"] == 0 and summary["error_frames"] == 0, state.unexpected
    assert summary["latency_s"]["p95"] is not None and summary["first_interim_from_speech_start_s"] is not None
    assert summary["max_replicas"]["VADHost"] >= 1  # the replica timeline came from /healthz
    for name in ("report.md", "raw.json", "latency_vs_sessions.png", "replicas_over_time.png", "latency_histogram.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    raw = json.loads((tmp_path / "report" / "raw.json").read_text())
    assert len(raw["utterances"]) == summary["utterances_sent"] and "auth_secret" not in raw["config"]

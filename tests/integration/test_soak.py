"""Faults on the real Ray Serve (see conftest.py): replicas killed under live sessions, long
sessions, and connection churn. The session client, checks and process probes are the soak
tool's (speech_serve/loadtest/soak.py), which runs the same scenarios for an hour against `make serve`."""

import asyncio
import time

import numpy as np
import pytest

from speech_serve.loadtest.soak import (
    Probe,
    SessionLog,
    SoakConfig,
    check_session,
    load_clip,
    make_reference,
    reference_from,
    run_churn,
    run_long_sessions,
    stream_session,
)
from speech_serve.settings import StreamSettings
from tests.support.audio import TWO_UTTERANCES_WAV
from tests.support.service import ADMIN_TOKEN, APP, SECRET

pytestmark = pytest.mark.integration

# Growth allowed per Ingress / VADHost process once warm. RSS is coarse: the allocator's arenas
# grow with the peak number of connections during the first few hundred (measured here: up to
# +10 MB over 100 churn cycles, then +1 MB over the next 160), so it catches only big leaks (a
# session keeping its audio: 32 KB per second streamed). Python objects the GC tracks are exact
# for our own state; Serve's own bookkeeping moves them up to 65 either way here, while one leaked
# session leaves more than twenty, and a leak on a disconnect path would leave one per cycle.
RSS_GROWTH_LIMIT_MB = 25
OBJECT_GROWTH_LIMIT = 200


@pytest.fixture(scope="module")
def probe(service) -> Probe:
    return Probe(APP)


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    return load_clip(str(TWO_UTTERANCES_WAV), StreamSettings().vad_chunk_ms)


@pytest.fixture(scope="module")
def reference(service, clip):
    return asyncio.run(make_reference(f"ws://{service}", clip, SECRET))


def test_sessions_survive_losing_a_vad_then_a_sense_voice_and_a_speaker_replica(service, probe, clip):
    """Four live sessions streaming as fast as they are answered. A VADHost replica holding
    sessions is killed: they re-pin to the other replica and replay their unfinished audio. Then
    the SenseVoice replica and the Speaker replica are killed, each at a moment it has at least
    two requests in flight; with one replica of each, the retried calls wait for the
    replacements. Every utterance still gets exactly one result, in order,
    with the text of an undisturbed run of the same audio (and its embedding, or speaker unknown while
    the Speaker is down: the text does not wait for it), and no session is closed."""
    url, sessions, start = f"ws://{service}", 4, {"return_embedding": True}
    undisturbed = asyncio.run(stream_session(url, clip, 2, SessionLog(), start=start, auth_secret=SECRET))
    loop_ms = len(clip) // 16
    reference = reference_from(undisturbed.results, loop_ms)
    embeddings = {in_loop(r, loop_ms): r["speaker"]["embedding"] for r in undisturbed.results}
    replica_counts = {d: len(probe.replicas(d)) for d in ("VADHost", "SenseVoice", "Speaker")}

    kills: list[dict] = []

    def kill_in_turn(logs: list[SessionLog], stop: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
        def answered_each(more: int) -> None:
            target = min(len(log.results) for log in logs) + more
            while min(len(log.results) for log in logs) < target and not any(log.closed_early for log in logs):
                time.sleep(0.05)

        def kill(in_flight: dict[str, int]) -> None:
            for k in probe.kill_when_busy(in_flight, timeout_s=60):
                kills.append(k | {"wanted_in_flight": in_flight[k["deployment"]],
                                  "during_sessions": all(log.done is None for log in logs)})  # fmt: skip

        try:
            answered_each(2)
            kill({"VADHost": 1})  # VAD calls are short: one in flight will do
            answered_each(2)  # re-pinned sessions go on while the replacement starts
            # Two accepted requests in flight, so one is still unanswered when the kill lands. One
            # deployment at a time: both busy at the same instant may not happen (it did not in a CI run).
            kill({"SenseVoice": 2})
            kill({"Speaker": 2})
            for k in kills:
                k["replaced_after_s"] = probe.wait_replaced(
                    k["deployment"], k["replica"], replica_counts[k["deployment"]]
                )
            answered_each(2)  # the sessions go on after the faults
            # ...and name their speaker again once the Speaker's breaker closes (speaker.breaker_open_s)
            deadline = time.monotonic() + 60
            while not all(log.results[-1]["speaker"].get("embedding") for log in logs) and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            loop.call_soon_threadsafe(stop.set)

    async def run() -> list[SessionLog]:
        logs, stop = [SessionLog() for _ in range(sessions)], asyncio.Event()
        streams = [stream_session(url, clip, 100, log, ahead_s=30, stop=stop, start=start, device=i + 1,
                                  auth_secret=SECRET) for i, log in enumerate(logs)]  # fmt: skip
        await asyncio.gather(asyncio.to_thread(kill_in_turn, logs, stop, asyncio.get_running_loop()), *streams)
        return logs

    logs = asyncio.run(run())
    checks = [check_session(log, reference.expected(log.loops)) for log in logs]
    results = [r for log in logs for r in log.results]
    retried = {stage: sum(r["retries"].get(stage, 0) for r in results) for stage in ("asr", "speaker")}
    replays = [log.done["vad_replays"] if log.done else None for log in logs]
    print(f"kills {kills}\nretries {retried}, VAD replays {replays}\nchecks {checks}")
    assert [k["deployment"] for k in kills] == ["VADHost", "SenseVoice", "Speaker"]
    assert all(k["in_flight"] >= k["wanted_in_flight"] and k["during_sessions"] for k in kills), kills
    # A killed model replica's accepted requests fail to the Ingress, which retries them. Whether
    # any were still unanswered when a kill landed is a race (ray.kill is asynchronous, and the
    # batcher answers everything queued in one batch of ~30 ms with the tiny models): one of the
    # two kills must have caught work, and nothing may be lost either way (the checks below).
    assert retried["asr"] + retried["speaker"] >= 1 and sum(replays) >= 1
    for log, check in zip(logs, checks, strict=True):
        assert log.loops >= 3
        assert check == check | {"lost": 0, "unexpected": 0, "duplicated": 0, "wrong_text": 0, "errors": 0}, check
        assert check["answered"] == check["expected"] and check["in_order"] and check["done"]
        assert check["closed_early"] is None
        for r in log.results:  # the text never waits for a Speaker that is down: its speaker is unknown then
            if r["speaker"].get("embedding") is None:
                assert r["speaker"]["reason"] in ("speaker_late", "speaker_unavailable", "speaker_failed"), r
                continue
            np.testing.assert_allclose(r["speaker"]["embedding"], embeddings[in_loop(r, loop_ms)], atol=1e-5)
        assert log.results[-1]["speaker"].get("embedding") is not None  # the Speaker answers again
    assert len(probe.replicas("VADHost")) == 2  # replaced, for the tests after this one


def in_loop(result: dict, loop_ms: int) -> tuple[bool, int, int]:
    """Where an utterance sits in its loop: (first loop?, start, end), as the reference repeats."""
    k = result["start_ms"] // loop_ms
    return k == 0, result["start_ms"] - k * loop_ms, result["end_ms"] - k * loop_ms


def test_long_sessions_keep_ingress_and_vad_memory_flat(service, probe, clip, reference):
    """Two sessions stream 3 minutes of speech and silence each, faster than real time:
    every utterance is answered with the reference text, and once warm the Ingress and VADHost
    processes do not grow."""
    cfg = SoakConfig(url=f"ws://{service}", audio_hours=3 / 60, sessions=2, warmup=0.25, progress_s=5,
                     auth_secret=SECRET, admin_token=ADMIN_TOKEN)  # fmt: skip
    long = asyncio.run(run_long_sessions(cfg, reference, clip, probe))
    assert long["expected"] == long["answered"] > 40
    assert (long["lost"], long["duplicated"], long["wrong_text"], long["errors"]) == (0, 0, 0, 0)
    assert long["all_in_order"] and long["all_done"] and not long["session_failures"]
    assert {k.split("#")[0] for k in long["rss_mb_before"]} >= {"Ingress", "VADHost"}
    print(f"long sessions: {long['audio_hours']} h in {long['wall_s']} s; RSS MB before {long['rss_mb_before']}, "
          f"after {long['rss_mb_after']}; objects {long['python_objects_before']} -> "
          f"{long['python_objects_after']}")  # fmt: skip
    assert_flat(long)
    assert long["state_after"] == {"ingress_live_sessions": 0, "ingress_stream_tasks": 0, "vad_live_sessions": 0}


def test_churn_leaves_no_session_state_behind(service, probe, clip, reference):
    """100 connect / stream / disconnect cycles over the three protocols, four at a time; a third
    say goodbye (and get their results), a third drop the TCP connection mid-stream, a third close
    the WebSocket mid-stream. Afterwards: no live session or runner task on the Ingress, no VAD
    state on any VADHost, and no memory growth."""
    cfg = SoakConfig(url=f"ws://{service}", churn=100, concurrency=4, auth_secret=SECRET, admin_token=ADMIN_TOKEN,
                     progress_s=2)  # fmt: skip
    churn = asyncio.run(run_churn(cfg, reference, clip, probe))
    assert churn["cycles"] == 100 and churn["failed"] == []
    assert min(churn["by_kind"].values()) >= 33 and min(churn["by_protocol"].values()) >= 33
    assert churn["state_after"] == {"ingress_live_sessions": 0, "ingress_stream_tasks": 0, "vad_live_sessions": 0}
    print(f"churn: {churn['cycles']} cycles in {churn['wall_s']} s; RSS MB before {churn['rss_mb_before']}, "
          f"after {churn['rss_mb_after']}; objects {churn['python_objects_before']} -> "
          f"{churn['python_objects_after']}")  # fmt: skip
    assert_flat(churn)


def assert_flat(phase: dict) -> None:
    """The Ingress and both VADHost replicas, measured before and after, did not grow."""
    rss = {k: v for k, v in phase["rss_mb_growth"].items() if not k.startswith("proxy")}
    assert len(rss) == 3 and max(rss.values()) < RSS_GROWTH_LIMIT_MB, phase["rss_mb_growth"]
    objects = phase["python_objects_growth"]
    assert len(objects) == 3 and max(objects.values()) < OBJECT_GROWTH_LIMIT, objects

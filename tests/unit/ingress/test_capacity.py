"""Admission by compute, without Ray: the per-replica cap, the queue-delay guard, and the backlog
(stream/calls.py) that sheds optional work first."""

import pytest

from speech_serve.ingress.capacity import ComputeAdmission, sessions_for
from speech_serve.ingress.stream.calls import Backlog
from speech_serve.messages import ModelTiming
from speech_serve.replicas.registry import Limits, SessionLedger
from speech_serve.settings import AdmissionSettings, ComputeSettings
from speech_serve.wire.codes import CLOSE_TRY_AGAIN_LATER
from tests.support.fakes import ManualClock


def timing(replica: str, single_s: float = 0.15, batch_s: float = 0.6, cpus: float | None = None) -> ModelTiming:
    return ModelTiming(replica, "cpu", 1, cpus, utterance_s=3.0, batch=8, single_s=single_s, batch_s=batch_s)


def test_a_pinned_cap_follows_the_running_model_replicas():
    compute = ComputeAdmission(AdmissionSettings(), compute=ComputeSettings(sessions_per_asr_replica=8))
    assert compute.sessions_cap() == 8
    compute.asr_replicas = 3
    assert compute.sessions_cap() == 24
    compute.asr_replicas = 0  # between a replica's death and its replacement: still one's worth
    assert compute.sessions_cap() == 8
    off = ComputeAdmission(AdmissionSettings(), compute=ComputeSettings(sessions_per_asr_replica=None))
    assert off.sessions_cap() is None and off.report()["how"] == "off"


def test_a_replicas_sessions_come_from_its_speed_at_the_planned_utilization():
    """3 s of speech in 0.15 s alone is 20 speech-s/s; 40% of it over 0.6 speech-s/s per device is
    13.3 devices. The burst guard: 3.0 s target - 0.8 s end silence - 0.3 s overhead leaves 1.9 s for
    batches of 8 in 0.6 s: 8 x 1.9 / 0.6 = 25."""
    settings = ComputeSettings()
    fast = sessions_for(timing("a"), settings, end_silence_s=0.8)
    assert (fast.sessions, fast.by_rate, fast.by_burst) == (13, 13, 25)
    assert "3 s of speech in 0.150 s alone: 20.0 speech-s/s" in fast.why
    half_a_core = sessions_for(timing("a", cpus=0.5), settings, end_silence_s=0.8)  # Ray reserved half its thread
    assert (half_a_core.by_rate, half_a_core.by_burst) == (6, 12)
    longer_silence = sessions_for(timing("a"), settings, end_silence_s=1.3)  # less of the target is left
    assert longer_silence.by_burst == 18
    busier = sessions_for(timing("a"), ComputeSettings(utilization=0.7), end_silence_s=0.8)
    assert busier.by_rate == 23
    slow_host = sessions_for(timing("a", single_s=0.5, batch_s=20), settings, end_silence_s=0.8)
    assert slow_host.sessions == slow_host.by_burst == 1  # its batches would not come back in time: never 0


def test_the_measured_cap_sums_the_running_replicas_and_forgets_stopped_ones():
    compute = ComputeAdmission(AdmissionSettings(), compute=ComputeSettings(), end_silence_s=0.8)
    assert compute.measured and compute.sessions_cap() is None  # nothing heard yet: the queue guard alone
    compute.replicas_running(set())  # counted while the replicas still start: count again later
    assert not compute.known() and not compute.complete()
    compute.replicas_running({"a", "b"})
    compute.replica_seen(timing("a"))
    assert compute.known() and not compute.complete()  # b has not answered yet
    assert compute.sessions_cap() == 26  # b, not heard from yet, counts as a typical replica
    compute.replica_seen(timing("b", single_s=0.3))
    assert compute.sessions_cap() == 13 + 6 and compute.complete()
    compute.replicas_running({"b"})  # a stopped
    assert compute.sessions_cap() == 6 and set(compute.timings) == {"b"}
    report = compute.report()
    assert report["how"] == "measured" and report["cap"] == 6
    assert report["replicas"]["b"]["sessions"] == 6 and report["replicas"]["b"]["timing"]["single_s"] == 0.3


def test_new_sessions_wait_while_an_utterance_waits_too_long_and_come_back_once_it_is_answered():
    clock = ManualClock(1000.0)
    backlog = Backlog(AdmissionSettings(max_queue_delay_s=2.0), clock)
    compute = ComputeAdmission(AdmissionSettings(max_queue_delay_s=2.0), backlog)
    assert compute.refusal() is None and compute.backlog.queue_delay_s() == 0
    with compute.backlog.waiting():
        clock.now += 1.0
        with compute.backlog.waiting():  # a younger one does not hide the oldest
            assert compute.refusal() is None
            clock.now += 1.5
            refusal = compute.refusal()
            assert refusal.code == "server_busy" and refusal.close_code == CLOSE_TRY_AGAIN_LATER
            assert "2.5 s" in refusal.message
    assert compute.refusal() is None  # answered: the queue is empty, sessions come in again
    off_backlog = Backlog(AdmissionSettings(max_queue_delay_s=None), clock)
    off = ComputeAdmission(AdmissionSettings(max_queue_delay_s=None), off_backlog)
    with off.backlog.waiting():
        clock.now += 60
        assert off.refusal() is None


def test_the_registry_refuses_past_the_compute_cap_cluster_wide():
    ledger = SessionLedger(Limits(max_sessions_total=100, max_connections_per_device=None), lease_s=30)
    for i in range(4):  # sessions from two Ingress replicas count together
        assert ledger.admit(f"s{i}", f"ingress-{i % 2}", None, now=0.0, compute_cap=4) is None
    refusal = ledger.admit("s4", "ingress-0", None, now=0.0, compute_cap=4)
    assert refusal.code == "server_busy" and refusal.close_code == CLOSE_TRY_AGAIN_LATER
    assert "serve 4 sessions" in refusal.message
    assert ledger.admit("s4", "ingress-0", None, now=0.0) is None  # no compute cap: the counts only


def test_optional_work_is_shed_before_devices_are_refused_and_comes_back():
    """Interims go at 0.5 s of queue delay, the speaker model at 1 s, new devices at 2 s; all of
    it comes back once the oldest final is answered."""
    clock = ManualClock(1000.0)
    shed: list[str] = []
    settings = AdmissionSettings(shed_interims_delay_s=0.5, shed_speaker_delay_s=1.0, max_queue_delay_s=2.0)
    backlog = Backlog(settings, clock, on_shed=shed.append)
    compute = ComputeAdmission(settings, backlog)
    with backlog.waiting():
        clock.now += 0.4
        assert backlog.shedding() == [] and not backlog.shed("interim")
        clock.now += 0.2
        assert backlog.shedding() == ["interim"] and backlog.shed("interim") and not backlog.shed("speaker")
        clock.now += 0.5
        assert backlog.shedding() == ["interim", "speaker"] and backlog.shed("speaker")
        assert compute.refusal() is None  # the admitted lose optional work before anyone is refused
        clock.now += 1.0
        assert compute.refusal() is not None
    assert backlog.shedding() == [] and not backlog.shed("speaker")
    assert shed == ["interim", "speaker"]  # counted only when skipped


def test_shedding_is_off_unless_configured_and_must_come_before_refusing():
    clock = ManualClock(1000.0)
    backlog = Backlog(AdmissionSettings(), clock)
    with backlog.waiting():
        clock.now += 100
        assert backlog.shedding() == [] and not backlog.shed("interim")
    with pytest.raises(ValueError, match="interims before the speaker"):
        AdmissionSettings(shed_interims_delay_s=1.5, shed_speaker_delay_s=1.0)
    with pytest.raises(ValueError, match="before devices are refused"):
        AdmissionSettings(shed_speaker_delay_s=3.0, max_queue_delay_s=2.0)

"""Admission by compute, without Ray: the per-replica cap and the queue-delay guard."""

from deployments.registry import Limits, SessionLedger
from serve_app.ingress.capacity import ComputeAdmission
from serve_app.settings import AdmissionSettings
from serve_app.wire import CLOSE_TRY_AGAIN_LATER


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_sessions_cap_follows_the_running_model_replicas():
    compute = ComputeAdmission(AdmissionSettings(sessions_per_asr_replica=8))
    assert compute.sessions_cap() == 8
    compute.asr_replicas = 3
    assert compute.sessions_cap() == 24
    compute.asr_replicas = 0  # between a replica's death and its replacement: still one's worth
    assert compute.sessions_cap() == 8
    assert ComputeAdmission(AdmissionSettings()).sessions_cap() is None


def test_new_sessions_wait_while_an_utterance_waits_too_long_and_come_back_once_it_is_answered():
    clock = Clock()
    compute = ComputeAdmission(AdmissionSettings(max_queue_delay_s=2.0), clock)
    assert compute.refusal() is None and compute.queue_delay_s() == 0
    with compute.waiting_for_asr():
        clock.now += 1.0
        with compute.waiting_for_asr():  # a younger one does not hide the oldest
            assert compute.refusal() is None
            clock.now += 1.5
            refusal = compute.refusal()
            assert refusal.code == "server_busy" and refusal.close_code == CLOSE_TRY_AGAIN_LATER
            assert "2.5 s" in refusal.message
    assert compute.refusal() is None  # answered: the queue is empty, sessions come in again
    off = ComputeAdmission(AdmissionSettings(max_queue_delay_s=None), clock)
    with off.waiting_for_asr():
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

"""Admission without Ray: the application-wide ledger (overall cap, per-device limit, leases).
(An Ingress replica's own cap and sessions closed for idling or for never saying hello:
tests/unit/ingress/test_sessions.py.)"""

from deployments.registry import Limits, SessionLedger
from serve_app.wire import CLOSE_POLICY, CLOSE_TRY_AGAIN_LATER


def ledger(total=None, per_device=None, lease_s=30.0) -> SessionLedger:
    return SessionLedger(Limits(total, per_device), lease_s=lease_s)


def test_overall_cap_refuses_the_next_session_until_one_leaves():
    book = ledger(total=2)
    assert book.admit("a", "ing1", None, 0) is None and book.admit("b", "ing2", None, 0) is None
    refusal = book.admit("c", "ing1", None, 0)
    assert refusal.code == "server_busy" and refusal.close_code == CLOSE_TRY_AGAIN_LATER and "2" in refusal.message
    book.release("a")
    assert book.admit("c", "ing1", None, 1) is None and book.live == 2


def test_per_device_limit_counts_only_that_device():
    book = ledger(per_device=1)
    assert book.admit("a", "ing1", "dev-1", 0) is None
    refusal = book.admit("b", "ing2", "dev-1", 0)  # same device through another ingress replica
    assert refusal.code == "too_many_connections" and refusal.close_code == CLOSE_POLICY
    assert book.admit("c", "ing1", "dev-2", 0) is None
    assert book.admit("d", "ing1", None, 0) is None  # no device id: only the overall cap applies


def test_sync_forgets_sessions_whose_release_was_lost():
    book = ledger(total=3)
    for sid in ("a", "b", "c"):
        book.admit(sid, "ing1", None, 0)
    book.admit("x", "ing2", None, 0)  # refused: full
    book.sync("ing1", {"b"}, now=1)  # a and c ended, their releases never arrived
    assert book.live == 1
    assert book.admit("x", "ing2", None, 1) is None


def test_sessions_of_a_silent_ingress_expire_after_the_lease():
    book = ledger(total=2, lease_s=10)
    book.admit("a", "dead", None, 0)
    book.admit("b", "alive", None, 0)
    book.sync("alive", {"b"}, now=8)
    assert book.admit("c", "alive", None, 9) is not None  # full: "dead" is still within its lease
    book.sync("alive", {"b"}, now=11)
    assert book.live == 1  # "dead" said nothing for 11 s: its session is forgotten
    assert book.admit("c", "alive", None, 12) is None


def test_a_sync_does_not_drop_a_session_admitted_after_its_snapshot():
    book = ledger(total=10)
    book.admit("a", "ing1", None, 0, seq=1)
    # ing1 snapshots its sessions ({"a"}, admissions up to 1), then admits "b"; "b" lands first.
    book.admit("b", "ing1", None, 0, seq=2)
    book.sync("ing1", {"a"}, now=1, upto_seq=1)
    assert book.live == 2  # before the fix, "b" was dropped and the cap undercounted
    book.sync("ing1", {"a"}, now=2, upto_seq=2)  # now "b" really is gone (its release was lost)
    assert book.live == 1

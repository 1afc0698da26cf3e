"""Admission without Ray: the application-wide ledger (overall cap, per-device limit, leases).
(An Ingress replica's own cap and sessions closed for idling or for never saying hello:
tests/unit/ingress/test_sessions.py.)"""

from speech_serve.replicas.registry import Limits, SessionLedger
from speech_serve.wire.codes import CLOSE_POLICY, CLOSE_TRY_AGAIN_LATER


def ledger(total=None, per_device=None, lease_s=30.0) -> SessionLedger:
    return SessionLedger(Limits(total, per_device), lease_s=lease_s)


def test_overall_cap_refuses_the_next_session_until_one_leaves():
    book = ledger(total=2)
    assert book.admit("a", "ing1", None, 0) is None and book.admit("b", "ing2", None, 0) is None
    refusal = book.admit("c", "ing1", None, 0)
    assert refusal.code == "server_busy" and refusal.close_code == CLOSE_TRY_AGAIN_LATER and "2" in refusal.message
    book.release("a", 1)
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
    book.sync("ing1", {"b": None}, now=1)  # a and c ended, their releases never arrived
    assert book.live == 1
    assert book.admit("x", "ing2", None, 1) is None


def test_sessions_of_a_silent_ingress_expire_after_the_lease():
    book = ledger(total=2, lease_s=10)
    book.admit("a", "dead", None, 0)
    book.admit("b", "alive", None, 0)
    book.sync("alive", {"b": None}, now=8)
    assert book.admit("c", "alive", None, 9) is not None  # full: "dead" is still within its lease
    book.sync("alive", {"b": None}, now=11)
    assert book.live == 1  # "dead" said nothing for 11 s: its session is forgotten
    assert book.admit("c", "alive", None, 12) is None


def test_a_sync_does_not_drop_a_session_admitted_after_its_snapshot():
    book = ledger(total=10)
    book.admit("a", "ing1", None, 0, seq=1)
    # ing1 snapshots its sessions ({"a"}, admissions up to 1), then admits "b"; "b" lands first.
    book.admit("b", "ing1", None, 0, seq=2)
    book.sync("ing1", {"a": None}, now=1, upto_seq=1)
    assert book.live == 2  # before the fix, "b" was dropped and the cap undercounted
    book.sync("ing1", {"a": None}, now=2, upto_seq=2)  # now "b" really is gone (its release was lost)
    assert book.live == 1


def test_a_restarted_registry_learns_the_live_sessions_and_their_devices_from_the_syncs():
    """A registry replica lost with its node comes back empty. The Ingress replicas' periodic syncs
    rebuild it: before the fix a sync only dropped sessions, so the new registry admitted up to the
    cap again on top of every session still live, and a device's old connections did not count."""
    book = ledger(total=3, per_device=1)  # the replacement: it has seen no admission
    book.sync("ing1", {"a": "dev-1", "b": None}, now=1, upto_seq=5)
    book.sync("ing2", {"c": "dev-2"}, now=1, upto_seq=3)
    assert book.live == 3
    assert book.admit("d", "ing2", None, 2).code == "server_busy"
    book.release("b", 2)
    assert book.admit("e", "ing2", "dev-1", 3).code == "too_many_connections"  # a is dev-1's
    assert book.admit("e", "ing2", "dev-3", 3) is None
    book.sync("ing1", {"a": "dev-1"}, now=4, upto_seq=5)  # b ended: the same sync no longer lists it
    assert book.live == 3


def test_a_sync_does_not_bring_back_a_session_released_after_its_snapshot():
    book = ledger(total=10)
    book.admit("a", "ing1", "dev-1", 0, seq=1)
    # ing1 snapshots {a}; then a ends and its release overtakes the snapshot on the way
    book.release("a", 1)
    book.sync("ing1", {"a": "dev-1"}, now=2, upto_seq=1)
    assert book.live == 0
    book.sync("ing1", {}, now=7, upto_seq=1)  # the next snapshot no longer lists it
    assert book.live == 0 and book.admit("a2", "ing1", "dev-1", 8) is None


def test_a_session_whose_admission_is_on_its_way_is_neither_dropped_nor_counted_by_a_sync():
    book = ledger(total=1)
    book.admit("p", "ing1", None, 0, seq=2)  # its admission landed before the snapshot that calls it pending
    book.sync("ing1", {}, now=1, upto_seq=2, pending={"p"})
    assert book.live == 1
    fresh = ledger(total=1)  # a restarted registry: the pending admission has not landed yet
    fresh.sync("ing1", {}, now=1, upto_seq=2, pending={"p"})
    assert fresh.live == 0 and fresh.admit("p", "ing1", None, 2, seq=2) is None  # it may still be refused

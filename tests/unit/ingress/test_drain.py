"""Draining (drain.py): which replica is stopping, when its sessions are asked to reconnect, and
the watch that polls the controller."""

import asyncio

from speech_serve.ingress.drain import DrainPlan, DrainWatch, replica_is_stopping


def test_only_a_listed_stopping_replica_is_draining():
    states = {"a": "RUNNING", "b": "STOPPING"}
    assert replica_is_stopping(states, "b")
    assert not replica_is_stopping(states, "a")
    assert not replica_is_stopping(states, "c")  # unknown: never cut sessions on a guess
    assert not replica_is_stopping({}, "b")


def test_plan_asks_to_reconnect_margin_before_the_deadline():
    plan = DrainPlan(started=100.0, grace_s=600.0, margin_s=30.0)
    assert plan.reconnect_in(100.0) == 570.0
    assert plan.reconnect_in(669.0) == 1.0
    assert plan.reconnect_in(700.0) == 0.0
    assert DrainPlan(started=0.0, grace_s=20.0, margin_s=30.0).reconnect_in(0.0) == 0.0  # grace shorter: at once


def test_watch_polls_until_stopping_and_survives_controller_errors():
    replies = [RuntimeError("controller restarting"), {"me": "RUNNING"}, {"me": "STOPPING", "other": "RUNNING"}]
    calls = []

    async def fetch():
        calls.append(1)
        reply = replies[len(calls) - 1]
        if isinstance(reply, Exception):
            raise reply
        return reply

    watch = DrainWatch(fetch, "me", poll_s=0.001, grace_s=60, margin_s=10)
    assert not watch.draining
    plan = asyncio.run(asyncio.wait_for(watch.wait(), 5))
    assert watch.draining and len(calls) == 3
    assert (plan.grace_s, plan.margin_s) == (60, 10)


def test_a_controller_call_that_never_answers_does_not_end_the_watch():
    """`wait` awaited each controller call unbounded: one that never answered stopped the watch for
    good, and the replica never moved its sessions before Serve killed it."""
    calls = []

    async def fetch():
        calls.append(1)
        if len(calls) == 1:
            await asyncio.Event().wait()  # never
        return {"me": "STOPPING"}

    watch = DrainWatch(fetch, "me", poll_s=0.001, grace_s=60, margin_s=10, fetch_timeout_s=0.05)
    asyncio.run(asyncio.wait_for(watch.wait(), 5))
    assert watch.draining and len(calls) == 2

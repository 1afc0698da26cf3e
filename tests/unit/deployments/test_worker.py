import asyncio
import threading

import pytest

from deployments.worker import FINAL, INTERIM, PriorityWorker


def test_queued_finals_run_before_queued_interims():
    async def scenario():
        worker = PriorityWorker("test")
        gate = threading.Event()
        order: list[str] = []
        blocker = worker.submit(FINAL, gate.wait)  # occupies the thread while we queue the rest
        jobs = [
            worker.submit(INTERIM, order.append, "interim-1"),
            worker.submit(FINAL, order.append, "final-1"),
            worker.submit(INTERIM, order.append, "interim-2"),
            worker.submit(FINAL, order.append, "final-2"),
        ]
        gate.set()
        await asyncio.gather(blocker, *jobs)
        return order

    assert asyncio.run(scenario()) == ["final-1", "final-2", "interim-1", "interim-2"]


def test_errors_reach_the_caller_and_the_worker_goes_on():
    async def scenario():
        worker = PriorityWorker("test")
        with pytest.raises(ZeroDivisionError):
            await worker.submit(FINAL, lambda: 1 / 0)
        return await worker.submit(FINAL, lambda: 42)

    assert asyncio.run(scenario()) == 42

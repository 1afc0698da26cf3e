"""The model replicas' batcher, without Serve: batches form from what queued while the model was
busy, finals go first, callers that left are dropped, a bad request fails alone."""

import asyncio
import threading

import pytest

from speech_serve.replicas.worker import FINAL, INTERIM, Batcher
from speech_serve.settings import BatchSettings


class GatedModel:
    """Records each batch; the first batch holds the thread until the test opens the gate."""

    def __init__(self):
        self.batches: list[list] = []
        self.gate = threading.Event()

    def __call__(self, requests: list) -> list:
        self.batches.append(list(requests))
        if len(self.batches) == 1:
            self.gate.wait(5)
        if "bad" in requests:
            raise ValueError("bad input")
        return [f"out:{r}" for r in requests]


async def _queued_behind_a_running_batch(model, batcher, requests):
    """Submit one request, wait until the model runs it, queue `requests` [(name, priority)], open the gate."""
    first = asyncio.create_task(batcher.submit("first"))
    while not model.batches:
        await asyncio.sleep(0.005)
    tasks = {name: asyncio.create_task(batcher.submit(name, priority)) for name, priority in requests}
    await asyncio.sleep(0.02)
    return first, tasks


def test_requests_that_queue_while_the_model_runs_go_together_in_the_next_batch():
    async def scenario():
        model = GatedModel()
        batcher = Batcher("test", model, BatchSettings(max_batch_size=3, batch_wait_timeout_s=0))
        first, tasks = await _queued_behind_a_running_batch(model, batcher, [(f"r{i}", FINAL) for i in range(5)])
        model.gate.set()
        results = await asyncio.gather(first, *tasks.values())
        return model.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [["first"], ["r0", "r1", "r2"], ["r3", "r4"]]
    assert results == ["out:first"] + [f"out:r{i}" for i in range(5)]


def test_finals_run_before_interims_and_never_share_their_batch():
    async def scenario():
        model = GatedModel()
        batcher = Batcher("test", model, BatchSettings(max_batch_size=8, batch_wait_timeout_s=0))
        order = [("i1", INTERIM), ("f1", FINAL), ("i2", INTERIM), ("f2", FINAL)]
        first, tasks = await _queued_behind_a_running_batch(model, batcher, order)
        model.gate.set()
        await asyncio.gather(first, *tasks.values())
        return model.batches

    assert asyncio.run(scenario()) == [["first"], ["f1", "f2"], ["i1", "i2"]]


def test_a_request_whose_caller_left_is_dropped_not_computed():
    async def scenario():
        model = GatedModel()
        batcher = Batcher("test", model, BatchSettings(batch_wait_timeout_s=0))
        first, tasks = await _queued_behind_a_running_batch(model, batcher, [("gone", FINAL), ("stays", FINAL)])
        tasks["gone"].cancel()
        await asyncio.sleep(0.01)
        model.gate.set()
        await asyncio.gather(first, tasks["stays"])
        return model.batches, batcher.dropped

    batches, dropped = asyncio.run(scenario())
    assert batches == [["first"], ["stays"]] and dropped == 1


def test_a_bad_request_fails_alone_and_its_batch_mates_get_their_results():
    async def scenario():
        model = GatedModel()
        batcher = Batcher("test", model, BatchSettings(batch_wait_timeout_s=0))
        queued = [("a", FINAL), ("bad", FINAL), ("b", FINAL)]
        first, tasks = await _queued_behind_a_running_batch(model, batcher, queued)
        model.gate.set()
        await first
        return await asyncio.gather(*tasks.values(), return_exceptions=True)

    a, bad, b = asyncio.run(scenario())
    assert (a, b) == ("out:a", "out:b") and isinstance(bad, ValueError)


def test_from_idle_the_first_request_waits_for_company():
    async def scenario():
        model = GatedModel()
        model.gate.set()
        batcher = Batcher("test", model, BatchSettings(max_batch_size=8, batch_wait_timeout_s=0.1))
        first = asyncio.create_task(batcher.submit("a"))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(batcher.submit("b"))
        await asyncio.gather(first, second)
        return model.batches

    assert asyncio.run(scenario()) == [["a", "b"]]


def test_errors_reach_the_caller_and_the_batcher_goes_on():
    async def scenario():
        def model(requests):
            if requests == [0]:
                raise ZeroDivisionError
            return [r * 2 for r in requests]

        batcher = Batcher("test", model, BatchSettings(batch_wait_timeout_s=0))
        with pytest.raises(ZeroDivisionError):
            await batcher.submit(0)
        return await batcher.submit(21)

    assert asyncio.run(scenario()) == 42

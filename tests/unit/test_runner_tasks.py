"""`live_runner_tasks` (the leak check /healthz reports) counts a runner's tasks while it lives
and none after it is closed. No Ray here: a runner that never sends audio makes no model call."""

import asyncio

from serve_app.metrics import IngressMetrics
from serve_app.pipeline import Pipeline, RecognitionOptions, StreamRunner, live_runner_tasks
from serve_app.settings import AppSettings


async def _noop(*_args) -> None:
    return None


def test_runner_tasks_are_counted_while_it_lives_and_gone_after_close():
    async def scenario() -> list[int]:
        # No deployments behind it: closing only tries to free VAD state, and that failure is
        # logged and ignored as for a VAD replica that is already gone.
        pipeline = Pipeline(None, None, None, AppSettings(), "test", IngressMetrics())
        counts = [live_runner_tasks()]
        runners = [
            StreamRunner(pipeline, pipeline.new_session(f"s{i}"), RecognitionOptions(), _noop, _noop) for i in range(3)
        ]
        await asyncio.sleep(0)
        counts.append(live_runner_tasks())
        for runner in runners:
            runner.close()
        await asyncio.sleep(0)
        counts.append(live_runner_tasks())
        return counts

    assert asyncio.run(scenario()) == [0, 3, 0]

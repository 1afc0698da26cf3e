"""`live_stream_tasks` (the leak check /healthz reports) counts an utterance stream's tasks while
it lives and none after it is closed. No Ray here: a stream that never sends audio makes no model
call."""

import asyncio

import numpy as np

from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.recognition import ModelCalls, RecognitionOptions, UtteranceStreams, live_stream_tasks
from speech_serve.settings import AppSettings


async def _noop(*_args) -> None:
    return None


def test_stream_tasks_are_counted_while_it_lives_and_gone_after_close():
    async def scenario() -> list[int]:
        # No deployments behind it: closing only tries to free VAD state, and that failure is
        # logged and ignored as for a VAD replica that is already gone.
        settings = AppSettings()
        models = ModelCalls(None, None, None, settings.retry, "test")
        streams = UtteranceStreams(models, settings.ingress, settings.speaker.keep_embeddings, IngressMetrics())
        counts = [live_stream_tasks()]
        runners = [streams.open(f"s{i}", RecognitionOptions(), _noop, _noop) for i in range(3)]
        await asyncio.sleep(0)
        counts.append(live_stream_tasks())
        for runner in runners:
            runner.close()
        await asyncio.sleep(0)
        counts.append(live_stream_tasks())
        return counts

    assert asyncio.run(scenario()) == [0, 3, 0]


def test_a_call_whose_model_replica_died_is_retried_and_counted():
    """The integration test kills replicas, but whether a kill catches a request in flight is a
    race: here the Speaker's first answer is a dead replica, every time."""
    from types import SimpleNamespace

    from ray.exceptions import ActorDiedError

    from speech_serve.settings import RetrySettings

    answers = [ActorDiedError(), "embedding"]

    async def remote(request):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def scenario():
        speaker = SimpleNamespace(embed=SimpleNamespace(remote=remote))
        calls = ModelCalls(None, None, speaker, RetrySettings(backoff_s=0.01), "test")
        embedding, _, retries = await calls.embed(np.zeros(1600, dtype=np.int16), None, "s1")
        return embedding, retries

    assert asyncio.run(scenario()) == ("embedding", 1)

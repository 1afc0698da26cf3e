"""One utterance's recognition when only the Speaker side fails: the finished text still goes out,
with speaker `unknown` and a reason (before, the whole utterance was answered `recognition_failed`).
No Ray: the replicas are stand-ins."""

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest

from speech_serve.ingress.protocols.plain import render_result
from speech_serve.ingress.recognition import ModelCalls, RecognitionOptions
from speech_serve.messages import SpeakerEmbedding, Transcript, Utterance
from speech_serve.settings import RetrySettings

TEXT = Transcript("turn on the light", "en", "neutral", "Speech", "<|en|>turn on the light")


def utterance(ms: int = 1000) -> Utterance:
    return Utterance(0, 0, ms, np.full(ms * 16, 500, dtype=np.int16))


def remote(answer, log: list | None = None):
    async def call(request):
        if log is not None:
            log.append(request)
        if isinstance(answer, BaseException):
            raise answer
        if answer == "never":
            await asyncio.Event().wait()
        return answer

    return SimpleNamespace(remote=call)


def recognise(asr_answer, speaker_answer, utt: Utterance | None = None, speaker_log: list | None = None, **kw):
    async def scenario():
        asr = SimpleNamespace(transcribe=remote(asr_answer))
        speaker = SimpleNamespace(embed=remote(speaker_answer, speaker_log))
        calls = ModelCalls(None, asr, speaker, RetrySettings(try_timeout_s=0.05), "test", **kw)
        return await asyncio.wait_for(calls.recognise("s1", utt or utterance(), RecognitionOptions()), 5)

    return asyncio.run(scenario())


def good_embedding() -> SpeakerEmbedding:
    return SpeakerEmbedding(np.ones(192, np.float32), "eres2netv2", label="alice", score=0.9, speaker_id="spk1")


def test_the_text_goes_out_with_speaker_unknown_when_the_speaker_call_fails():
    result, embedding = recognise(TEXT, RuntimeError("database is locked"))
    assert result.text == "turn on the light" and embedding is None
    assert (result.speaker.label, result.speaker.score, result.speaker.reason) == ("unknown", None, "speaker_failed")
    frame = json.loads(render_result(result))
    assert frame["speaker"]["label"] == "unknown" and frame["speaker"]["reason"] == "speaker_failed"
    assert "speaker" not in result.batch_sizes


def test_a_speaker_that_never_answers_does_not_hold_the_text():
    result, _ = recognise(TEXT, "never")
    assert result.text == "turn on the light" and result.speaker.reason == "speaker_failed"


@pytest.mark.parametrize("vector", [np.zeros(192, np.float32), np.full(192, np.nan, np.float32)])
def test_a_zero_or_nan_embedding_is_unknown_and_not_kept_for_enrolment(vector):
    result, embedding = recognise(TEXT, SpeakerEmbedding(vector, "eres2netv2"))
    assert embedding is None  # the stream keeps only usable embeddings (enrol-from-session)
    assert (result.speaker.label, result.speaker.reason) == ("unknown", "no_embedding")
    assert "NaN" not in render_result(result)


def test_a_clip_too_short_for_the_speaker_model_is_not_sent_to_it():
    """ERes2NetV2 gives NaN under about 105 ms (measured): such a clip would fail its batch."""
    sent: list = []
    result, _ = recognise(TEXT, good_embedding(), utterance(80), sent, speaker_min_ms=150)
    assert sent == [] and result.text == "turn on the light" and result.speaker.reason == "too_short"


def test_an_asr_failure_still_fails_the_utterance():
    with pytest.raises(RuntimeError, match="fbank"):
        recognise(RuntimeError("fbank"), good_embedding())


def test_a_good_answer_has_no_reason():
    result, embedding = recognise(TEXT, good_embedding())
    assert (result.speaker.label, result.speaker.reason, embedding.label) == ("alice", None, "alice")
    assert "reason" not in json.loads(render_result(result))["speaker"]


def test_under_load_the_speaker_model_is_shed_and_the_result_says_so():
    calls = []
    result, embedding = recognise(TEXT, good_embedding(), speaker_log=calls, shed=lambda what: what == "speaker")
    assert result.text == "turn on the light" and embedding is None and calls == []  # never asked
    frame = json.loads(render_result(result))
    assert frame["speaker"] == {"label": "unknown", "score": None, "speaker_id": None, "embedding_id": None,
                                "reason": "shed"}  # fmt: skip

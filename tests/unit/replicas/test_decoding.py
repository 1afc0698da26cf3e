"""Words, confidences and hotwords from SenseVoice's own pass (replicas/decoding.py), on the tiny
model: the captured posteriors decode to funasr's text, words sit inside their utterance, and
hotwords go through the beam search."""

import pytest

from speech_serve.messages import AsrRequest
from speech_serve.replicas.asr import AsrCore
from speech_serve.settings import AsrSettings


@pytest.mark.parametrize("quantize, trace", [("none", False), ("int8", True)])
def test_words_come_from_the_same_pass_and_leave_the_text_as_it_was(tiny_models, two_utterances, quantize, trace):
    """Asking for words (no hotwords) decodes the captured posteriors greedily: the same raw text as
    funasr's own decode, each word inside the utterance, in order, with a confidence; the request
    beside it in the batch that asked for nothing is untouched. Quantized and traced encoders too."""
    asr = AsrCore(tiny_models.asr, AsrSettings(threads=1, quantize=quantize, trace_encoder=trace))
    a, b = two_utterances[8000:44800], two_utterances[68800:112000]
    plain_a, plain_b = asr.transcribe_batch([AsrRequest(a), AsrRequest(b)])
    with_words, beside = asr.transcribe_batch([AsrRequest(a, words=True), AsrRequest(b)])
    assert with_words.raw_text == plain_a.raw_text and beside.raw_text == plain_b.raw_text
    assert beside.words is None and beside.confidence is None
    words = with_words.words
    assert [w.text for w in words] == with_words.text.split()  # one word per space-marked piece
    assert all(0 <= w.start_ms < w.end_ms <= len(a) // 16 + 60 for w in words)
    assert [w.start_ms for w in words] == sorted(w.start_ms for w in words)
    assert all(0 < w.confidence <= 1 for w in words) and 0 < with_words.confidence <= 1


def test_hotwords_go_through_the_beam_search_and_an_empty_list_changes_nothing(tiny_models, two_utterances):
    """The tiny model's random posteriors are nearly flat (every token about as likely), so a hotword
    is within its bonus almost anywhere: a phrase it never says appears, an empty list is funasr's
    text, and a phrase its vocabulary cannot spell changes nothing."""
    asr = AsrCore(tiny_models.asr, AsrSettings(threads=1, quantize="none", trace_encoder=False))
    a = two_utterances[8000:44800]
    plain = asr.transcribe_batch([AsrRequest(a)])[0]
    assert asr.transcribe_batch([AsrRequest(a, hotwords=())])[0].raw_text == plain.raw_text
    phrase = plain.text.split()[0]  # a word the model says anyway: its bonus keeps it
    kept = asr.transcribe_batch([AsrRequest(a, hotwords=((phrase, 1.0),))])[0]
    assert phrase in kept.text and kept.words
    assert "w100 w200" not in plain.text
    assert "w100 w200" in asr.transcribe_batch([AsrRequest(a, hotwords=(("w100 w200", 3.0),))])[0].text
    unspellable = asr.transcribe_batch([AsrRequest(a, hotwords=(("小智", 5.0),))])[0]
    assert unspellable.raw_text == plain.raw_text

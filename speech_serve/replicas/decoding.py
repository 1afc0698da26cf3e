"""SenseVoice's text with word times, confidences and hotwords: funasr's own forward pass (fbank,
task queries, encoder, batched across sessions) with its CTC posteriors captured, then each
utterance decoded by `replicas/ctc.py` (greedy, or a beam search over its own hotwords).

The first 4 posterior frames answer SenseVoice's task queries (language, emotion, event, text
normalisation): their tags are decoded greedily, as funasr does; the words come from the rest.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import numpy as np
import torch

from speech_serve.messages import AsrRequest, Word
from speech_serve.replicas.ctc import (
    FRAME_MS,
    ContextGraph,
    Decoded,
    beam_search,
    greedy,
    span_confidence,
    word_spans,
)

TASK_FRAMES = 4  # language, emotion + event, text normalisation
TAG = re.compile(r"<\|[^|]*\|>")  # a task tag token (`<|en|>`): not a word


class Posteriors:
    """What one generate() call's CTC head gave: log-probabilities [batch, frames, vocabulary] and
    each utterance's frame count."""

    def __init__(self):
        self.logp: np.ndarray | None = None
        self.frames: list[int] = []

    def of(self, i: int) -> np.ndarray:
        assert self.logp is not None, "generate() ran no encoder"
        return self.logp[i, : self.frames[i]]


class _Recording(torch.nn.Module):
    """The encoder as it was, recording each utterance's frame count (a module: torch refuses anything
    else in a module's place)."""

    def __init__(self, encoder: torch.nn.Module, out: Posteriors):
        super().__init__()
        self.encoder, self.out = encoder, out

    def forward(self, speech, lengths, *args, **kwargs):
        result = self.encoder(speech, lengths, *args, **kwargs)
        self.out.frames = [int(n) for n in result[1].tolist()]
        return result


@contextmanager
def captured(model):
    """Around one `generate()` of a SenseVoiceSmall (`model`): its posteriors, as funasr computed them
    for its own greedy decode (same fbank, queries and encoder, quantized or traced as prepared)."""
    out = Posteriors()
    encoder, log_softmax = model.encoder, model.ctc.log_softmax

    def posteriors(hidden):
        logp = log_softmax(hidden)
        out.logp = logp.detach().float().cpu().numpy()
        return logp

    model.encoder, model.ctc.log_softmax = _Recording(encoder, out), posteriors
    try:
        yield out
    finally:
        model.encoder = encoder
        del model.ctc.log_softmax  # the instance attribute: the class's method shows again


class Decoder:
    """One utterance's posteriors to (raw tagged text, words, confidence), with its tokenizer."""

    def __init__(self, tokenizer, beam: int):
        self.tokenizer, self.beam = tokenizer, beam
        self._pieces: dict[int, str] = {}

    @property
    def _sp(self):
        """funasr's SentencePiece processor (it loads it on first use)."""
        if self.tokenizer.sp is None:
            self.tokenizer.encode("")
        return self.tokenizer.sp

    def piece(self, token: int) -> str:
        """A token's piece, `▁` marking a word's start (funasr's ids2tokens decodes, losing the mark)."""
        if token not in self._pieces:
            self._pieces[token] = self._sp.IdToPiece(token)
        return self._pieces[token]

    def graph(self, hotwords: tuple[tuple[str, float], ...]) -> ContextGraph | None:
        """The hotwords the vocabulary can spell (a phrase with an unknown piece could only ever add <unk>)."""
        unknown = self._sp.unk_id()
        phrases = [(ids, weight) for phrase, weight in hotwords
                   if (ids := self.tokenizer.encode(phrase)) and unknown not in ids]  # fmt: skip
        return ContextGraph(phrases) if phrases else None

    def decode(self, logp: np.ndarray, request: AsrRequest) -> tuple[str, tuple[Word, ...], float | None]:
        graph = self.graph(request.hotwords)
        if graph is None:  # funasr's own decode, over every frame
            decoded = greedy(logp)
        else:  # the task frames' tags as funasr has them, the words by beam search
            body = beam_search(logp[TASK_FRAMES:], graph, beam=self.beam)
            decoded = Decoded(greedy(logp[:TASK_FRAMES]).tokens + tuple(t.later(TASK_FRAMES) for t in body.tokens))
        raw = self.tokenizer.decode(decoded.ids)
        spoken = Decoded(tuple(t for t in decoded.tokens if not TAG.fullmatch(self.piece(t.id))))
        words = []
        for span in word_spans(spoken, self.piece):
            text = self.tokenizer.decode([t.id for t in span]).strip()
            if text:  # times from the audio's start: the task frames hold none of it
                start, end = (max(frame - TASK_FRAMES, 0) * FRAME_MS for frame in (span[0].first, span[-1].last + 1))
                words.append(Word(text, start, max(end, start + FRAME_MS), span_confidence(span)))
        return raw, tuple(words), spoken.confidence()

"""Decoding SenseVoice's CTC posteriors: greedy (what funasr does), or a prefix beam search that
boosts hotwords; both give each token's frames and log-probability, hence word times and
confidences. Pure numpy, no model: the SenseVoice replica runs the encoder (batched across
sessions), then decodes each utterance here with its own hotwords.

Posteriors: `logp` [frames, vocabulary], log-softmax over tokens, one frame per 60 ms of audio
(SenseVoice's 10 ms fbank, stacked 6 to 1), the task frames (language, emotion, event, text norm)
already cut off by the caller. Token 0 is CTC's blank.

Hotwords follow icefall's and sherpa-onnx's context graph: a trie of the hotwords' token
sequences. Each token that extends a match in the trie earns `weight`; a match that breaks off
gives back what it earned; a completed hotword keeps its bonus. The bonus joins the CTC score in
the beam's ranking only, so with no hotwords the beam search ranks as CTC alone does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

BLANK = 0
FRAME_MS = 60  # one posterior frame per 60 ms of audio
NEG_INF = -math.inf


@dataclass(frozen=True)
class Token:
    id: int
    first: int  # frame where it was emitted
    last: int  # last frame it held (a token's run of frames, before the next token or blank)
    logprob: float  # at the frame where it was emitted

    def later(self, frames: int) -> Token:
        """The same token, `frames` further on (a decode of a slice, placed back in the whole)."""
        return Token(self.id, self.first + frames, self.last + frames, self.logprob)

    @property
    def start_ms(self) -> int:
        return self.first * FRAME_MS

    @property
    def end_ms(self) -> int:
        return (self.last + 1) * FRAME_MS


@dataclass(frozen=True)
class Decoded:
    tokens: tuple[Token, ...]

    @property
    def ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    def confidence(self) -> float | None:
        """exp(mean token log-probability): 1.0 when every token was certain. None: no token."""
        if not self.tokens:
            return None
        return math.exp(sum(t.logprob for t in self.tokens) / len(self.tokens))


def greedy(logp: np.ndarray) -> Decoded:
    """The best token of every frame, repeats merged, blanks dropped: funasr's decode."""
    best = logp.argmax(axis=1)
    tokens: list[Token] = []
    previous = BLANK
    for t, k in enumerate(best.tolist()):
        if k != BLANK and k != previous:
            tokens.append(Token(k, t, t, float(logp[t, k])))
        elif k != BLANK and tokens:  # the same token held: its run goes on
            tokens[-1] = Token(k, tokens[-1].first, t, tokens[-1].logprob)
        previous = k
    return Decoded(tuple(tokens))


# ---- hotwords ------------------------------------------------------------------------------------
@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    weight: float = 0.0  # the bonus for reaching this node (the largest of the hotwords through it)
    word_end: bool = False


class ContextGraph:
    """A trie of hotwords as token-id sequences, each token of a match worth `weight` (log domain)."""

    def __init__(self, hotwords: list[tuple[list[int], float]]):
        self.root = _Node()
        for ids, weight in hotwords:
            node = self.root
            for k in ids:
                node = node.children.setdefault(k, _Node())
                node.weight = max(node.weight, weight)
            node.word_end = True

    def step(self, node: _Node, earned: float, k: int) -> tuple[_Node, float, float]:
        """After token `k`: (the node, the bonus earned in the current match, the score change)."""
        child = node.children.get(k)
        if child is not None:
            return self._enter(child, earned, 0.0)
        # the match broke off: give back what it earned, and maybe start a new one with this token
        restart = self.root.children.get(k)
        if restart is None:
            return self.root, 0.0, -earned
        return self._enter(restart, 0.0, -earned)

    def _enter(self, node: _Node, earned: float, change: float) -> tuple[_Node, float, float]:
        gain = node.weight
        if node.word_end:  # a whole hotword: its bonus is kept (a longer one may still go on from here)
            return (node if node.children else self.root), 0.0, change + gain
        return node, earned + gain, change + gain


@dataclass
class _Prefix:
    tokens: tuple[Token, ...]
    blank: float  # log P(prefix, ending in blank)
    nonblank: float  # log P(prefix, ending in its last token)
    node: _Node
    earned: float  # hotword bonus in the open match
    bonus: float  # hotword bonus in all

    @property
    def ctc(self) -> float:
        return np.logaddexp(self.blank, self.nonblank)

    @property
    def score(self) -> float:
        return self.ctc + self.bonus


def _adder(prefixes: dict[tuple[int, ...], _Prefix]):
    """Adds a path to a prefix of the next frame: one prefix reached by two alignments sums them
    (and keeps the likelier one's times)."""

    def add(key, tokens, blank, nonblank, node, earned, bonus) -> None:
        have = prefixes.get(key)
        if have is None:
            prefixes[key] = _Prefix(tokens, blank, nonblank, node, earned, bonus)
            return
        if np.logaddexp(blank, nonblank) > have.ctc:
            have.tokens = tokens
        have.blank, have.nonblank = np.logaddexp(have.blank, blank), np.logaddexp(have.nonblank, nonblank)

    return add


def beam_search(logp: np.ndarray, graph: ContextGraph | None = None, beam: int = 4,
                token_beam: int | None = None) -> Decoded:  # fmt: skip
    """CTC prefix beam search, `beam` prefixes kept per frame, each frame's `token_beam` best tokens
    tried (default: `beam`); hotwords from `graph` add their bonus to the ranking. A hotword's next
    token is tried too where its bonus lifts it to the frame's best: a hotword wins where the
    posteriors put it within its bonus, not only where it is already among the best."""
    token_beam = token_beam or beam
    root = graph.root if graph is not None else _Node()
    starts = np.fromiter(root.children, dtype=np.int64, count=len(root.children))
    start_bonus = np.array([root.children[k].weight for k in starts.tolist()])
    prefixes: dict[tuple[int, ...], _Prefix] = {(): _Prefix((), 0.0, NEG_INF, root, 0.0, 0.0)}
    for t in range(logp.shape[0]):
        frame = logp[t]
        best = np.argpartition(-frame, min(token_beam, len(frame) - 1))[:token_beam]
        floor = frame[best].min()
        candidates = set(best.tolist()) | set(starts[frame[starts] + start_bonus >= floor].tolist())
        nxt: dict[tuple[int, ...], _Prefix] = {}
        add = _adder(nxt)
        for key, p in prefixes.items():
            # blank: the prefix stays
            add(key, p.tokens, p.ctc + frame[BLANK], NEG_INF, p.node, p.earned, p.bonus)
            last = key[-1] if key else None
            going_on = {k for k, child in p.node.children.items() if frame[k] + child.weight >= floor}
            for k in candidates | going_on:
                if k == BLANK:
                    continue
                if k == last:
                    # the last token held (no blank between): the same prefix, its run one frame longer
                    held = p.tokens[:-1] + (Token(k, p.tokens[-1].first, t, p.tokens[-1].logprob),)
                    add(key, held, NEG_INF, p.nonblank + frame[k], p.node, p.earned, p.bonus)
                    # the same token again after a blank: a new token
                    source = p.blank
                else:
                    source = p.ctc
                if source == NEG_INF:
                    continue
                node, earned, gain = graph.step(p.node, p.earned, k) if graph is not None else (root, 0.0, 0.0)
                tokens = p.tokens + (Token(k, t, t, float(frame[k])),)
                add(key + (k,), tokens, NEG_INF, source + frame[k], node, earned, p.bonus + gain)
        prefixes = dict(sorted(nxt.items(), key=lambda item: item[1].score, reverse=True)[:beam])
    best = max(prefixes.values(), key=lambda p: p.ctc + p.bonus - p.earned)  # an unfinished match earns nothing
    return Decoded(best.tokens)


# ---- tokens to words -----------------------------------------------------------------------------
WORD_START = "\u2581"  # sentencepiece's space mark: a piece that begins a word


def _cjk(piece: str) -> bool:
    """Chinese, Japanese and Korean characters are words of their own (no spaces between them)."""
    return any("\u3040" <= c <= "\u30ff" or "\u3400" <= c <= "\u9fff" or "\uac00" <= c <= "\ud7af" for c in piece)


def word_spans(decoded: Decoded, piece_of: Callable[[int], str]) -> list[tuple[Token, ...]]:
    """The tokens of each word: a word starts at a piece that begins with the space mark, and every
    CJK character is one."""
    spans: list[list[Token]] = []
    previous_cjk = False
    for token in decoded.tokens:
        piece = piece_of(token.id)
        cjk = _cjk(piece)
        if not spans or piece.startswith(WORD_START) or cjk or previous_cjk:
            spans.append([token])
        else:
            spans[-1].append(token)
        previous_cjk = cjk
    return [tuple(span) for span in spans]


def span_confidence(span: tuple[Token, ...]) -> float:
    return math.exp(sum(t.logprob for t in span) / len(span))

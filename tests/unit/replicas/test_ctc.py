"""The CTC decoders (replicas/ctc.py) on constructed posteriors: greedy's tokens and times, the beam
search equal to greedy without hotwords, a hotword just below the greedy path winning with its
bonus and losing without, a broken-off match earning nothing, log-probabilities as set."""

import math

import numpy as np
import pytest

from speech_serve.replicas.ctc import BLANK, FRAME_MS, ContextGraph, beam_search, greedy

V = 8  # a small vocabulary: 0 is blank


def posteriors(frames: list[dict[int, float]]) -> np.ndarray:
    """One row per frame: the given token probabilities, the rest spread over the other tokens."""
    out = np.empty((len(frames), V))
    for t, probs in enumerate(frames):
        rest = (1.0 - sum(probs.values())) / (V - len(probs))
        out[t] = [probs.get(k, rest) for k in range(V)]
    return np.log(out)


# "3 3 _ 5 _ _ 5 5 _": tokens 3 (frames 0-1), 5 (3), 5 again after blanks (6-7)
CLEAR = posteriors([{3: 0.9}, {3: 0.8}, {BLANK: 0.9}, {5: 0.7}, {BLANK: 0.9}, {BLANK: 0.9}, {5: 0.6}, {5: 0.9},
                    {BLANK: 0.95}])  # fmt: skip


def test_greedy_merges_runs_and_keeps_each_tokens_frames_and_log_probability():
    decoded = greedy(CLEAR)
    assert decoded.ids == [3, 5, 5]
    assert [(t.first, t.last) for t in decoded.tokens] == [(0, 1), (3, 3), (6, 7)]
    assert [t.start_ms for t in decoded.tokens] == [0, 3 * FRAME_MS, 6 * FRAME_MS]
    assert decoded.tokens[2].end_ms == 8 * FRAME_MS
    assert [t.logprob for t in decoded.tokens] == pytest.approx([math.log(0.9), math.log(0.7), math.log(0.6)])
    assert decoded.confidence() == pytest.approx((0.9 * 0.7 * 0.6) ** (1 / 3))
    assert greedy(posteriors([{BLANK: 0.9}] * 3)).confidence() is None


def test_without_hotwords_the_beam_search_gives_greedys_tokens_and_times():
    rng = np.random.default_rng(1)
    for _ in range(50):  # peaky posteriors, as a trained CTC model's are
        frames = [{int(rng.integers(0, V)): float(rng.uniform(0.6, 0.95))} for _ in range(int(rng.integers(1, 30)))]
        logp = posteriors(frames)
        assert beam_search(logp, beam=4).tokens == greedy(logp).tokens


# greedy says 3 4 (token 6 is second-best at frame 2, just below 4); the hotword is 3 6
NEAR = posteriors([{3: 0.8}, {BLANK: 0.8}, {4: 0.45, 6: 0.35}, {BLANK: 0.9}])


def test_a_hotword_just_below_the_greedy_path_wins_with_its_bonus_and_loses_without():
    assert greedy(NEAR).ids == [3, 4]
    assert beam_search(NEAR, None).ids == [3, 4]
    assert beam_search(NEAR, ContextGraph([([3, 6], 0.05)])).ids == [3, 4]  # a bonus well under the CTC gap
    boosted = beam_search(NEAR, ContextGraph([([3, 6], 1.0)]))
    assert boosted.ids == [3, 6] and boosted.tokens[1].first == 2
    assert boosted.tokens[1].logprob == pytest.approx(math.log(0.35))  # the model's own, not the bonus


def test_a_match_that_breaks_off_earns_nothing():
    """Hotword 3 2 7: the path has 3 then 2 (nearly 6) then 4, far above 7, so the partial match gives
    its bonus back and the CTC-best path stands; a bonus on a token the posteriors put far below
    never wins."""
    logp = posteriors([{3: 0.8}, {BLANK: 0.8}, {6: 0.5, 2: 0.4}, {BLANK: 0.9}, {4: 0.9}, {BLANK: 0.9}])
    assert beam_search(logp, ContextGraph([([3, 2, 7], 1.0)])).ids == [3, 6, 4]
    assert beam_search(logp, ContextGraph([([3, 2, 7], 2.0)])).ids == [3, 2, 7, 4]  # 3 x 2.0 pays for 7
    far = posteriors([{3: 0.8}, {BLANK: 0.8}, {4: 0.97}, {BLANK: 0.9}])
    assert beam_search(far, ContextGraph([([3, 6], 1.0)])).ids == [3, 4]


def test_a_hotword_token_outside_the_frames_best_is_tried_where_its_bonus_reaches_them():
    """With 2 tokens tried per frame, 6 (0.1) is third after 4 and 5: a bonus that lifts it past the
    second best puts the hotword in the text; one that does not leaves the acoustic path."""
    logp = posteriors([{3: 0.8}, {BLANK: 0.8}, {4: 0.6, 5: 0.2, 6: 0.1}, {BLANK: 0.9}])
    assert beam_search(logp, None, beam=2).ids == [3, 4]
    assert beam_search(logp, ContextGraph([([3, 6], 1.0)]), beam=2).ids == [3, 6]
    assert beam_search(logp, ContextGraph([([6], 2.0)]), beam=2).ids == [3, 6]  # a hotword's first token too
    assert beam_search(logp, ContextGraph([([3, 6], 0.2)]), beam=2).ids == [3, 4]


def test_hotwords_sharing_a_prefix_and_a_repeated_token_after_a_blank():
    graph = ContextGraph([([3], 0.5), ([3, 6], 1.0)])
    assert beam_search(NEAR, graph).ids == [3, 6]
    assert beam_search(CLEAR, graph).ids == [3, 5, 5]  # "5 _ _ 5": two tokens, as greedy has them


def test_tokens_group_into_words_at_the_space_mark_and_per_cjk_character():
    from speech_serve.replicas.ctc import span_confidence, word_spans

    pieces = {1: "\u2581hel", 2: "lo", 3: "\u2581world", 4: "你", 5: "好", 6: "\u2581ok"}
    logp = posteriors([{1: 0.9}, {2: 0.8}, {3: 0.7}, {4: 0.9}, {5: 0.6}, {6: 0.5}, {BLANK: 0.9}])
    decoded = greedy(logp)
    spans = word_spans(decoded, pieces.__getitem__)
    assert [[t.id for t in span] for span in spans] == [[1, 2], [3], [4], [5], [6]]
    assert span_confidence(spans[0]) == pytest.approx((0.9 * 0.8) ** 0.5)
    assert (spans[0][0].start_ms, spans[0][-1].end_ms) == (0, 2 * FRAME_MS)

"""VADHost's core (replicas/vad.py) on the real fsmn-vad: utterances found, sessions interleaved,
replays asked for, resets, batched steps, idle sessions forgotten; and its autoscaling policy."""

from types import SimpleNamespace

import numpy as np
import pytest

from speech_serve.replicas.vad import SessionsPolicy, VadCore, replicas_for_sessions
from speech_serve.settings import VadSettings
from tests.support.audio import TWO_UTTERANCES_SPEECH_MS


@pytest.fixture(scope="module")
def vad(tiny_models):
    return VadCore(tiny_models.vad, VadSettings(max_end_silence_ms=600))


def stream(vad, session_id, pcm, chunk_ms=200):
    events, step = [], chunk_ms * 16
    for i in range(0, len(pcm), step):
        final = i + step >= len(pcm)
        result = vad.feed(session_id, pcm[i : i + step], i // 16, final=final)
        assert not result.state_lost
        events += result.events
    return events


def pairs(events):
    starts = [e.ms for e in events if e.kind == "start"]
    ends = [e.ms for e in events if e.kind == "end"]
    return list(zip(starts, ends, strict=True))


def ctx(metrics, target=2):
    return SimpleNamespace(aggregated_metrics=metrics, target_num_replicas=target)


def test_vad_finds_both_utterances(vad, two_utterances):
    found = pairs(stream(vad, "a", two_utterances))
    assert len(found) == 2
    for (start, end), (true_start, true_end) in zip(found, TWO_UTTERANCES_SPEECH_MS, strict=True):
        assert abs(start - true_start) < 400 and abs(end - true_end) < 400
    assert vad.live_sessions == 0  # the final chunk ends the stream


def test_vad_sessions_interleave_without_mixing(vad, two_utterances):
    step = 200 * 16
    events = {"x": [], "y": []}
    for i in range(0, len(two_utterances), step):
        final = i + step >= len(two_utterances)
        for sid in events:
            events[sid] += vad.feed(sid, two_utterances[i : i + step], i // 16, final=final).events
    assert pairs(events["x"]) == pairs(events["y"]) and len(pairs(events["x"])) == 2


def test_vad_unknown_session_or_gap_asks_for_replay(vad, two_utterances):
    assert vad.feed("late", two_utterances[:3200], 400).state_lost
    vad.feed("gap", two_utterances[:3200], 0)
    assert vad.feed("gap", two_utterances[:3200], 999).state_lost
    assert vad.close("gap") is False  # already dropped by the gap
    restarted = vad.feed("late", two_utterances[6400:9600], 400, restart=True)
    assert not restarted.state_lost
    assert vad.close("late") is True and vad.live_sessions == 0


def test_vad_reset_between_utterances_keeps_segments(tiny_models, two_utterances):
    """With a reset after every 1 s of silence, the cache stays small and both utterances are still found."""
    vad = VadCore(tiny_models.vad, VadSettings(max_end_silence_ms=600, reset_after_ms=1000))
    long_audio = np.concatenate([two_utterances] * 3)
    found = pairs(stream(vad, "long", long_audio))
    assert len(found) == 6
    offset = len(two_utterances) // 16
    for k, (start, _end) in enumerate(found):
        assert abs(start - (TWO_UTTERANCES_SPEECH_MS[k % 2][0] + offset * (k // 2))) < 400


def cut(vad, key, pcm, piece_ms):
    found, step = [], piece_ms * 16
    for at in range(0, len(pcm), step):
        done = vad.segment_piece(key, pcm[at : at + step], at // 16, final=at + step >= len(pcm))
        assert done is not None
        found += done
    return found


@pytest.mark.parametrize("piece_ms", [700, 2000, 10_000])
def test_a_file_cut_in_pieces_gets_the_segments_of_one_whole_file_pass(vad, two_utterances, piece_ms):
    """An upload is segmented a piece per call so the live sessions' steps take turns with it; the
    streaming model continues its cache, so the segments are those of one offline pass."""
    audio = np.concatenate([two_utterances, np.zeros(16000, dtype=np.int16)] * 3)
    whole = [(int(a), int(b)) for a, b in vad.model.generate(input=audio / 32768, cache={}, is_final=True)[0]["value"]]
    assert len(whole) == 6
    assert cut(vad, f"file-{piece_ms}", audio, piece_ms) == whole
    assert not vad._files  # the last piece freed the cut


def test_a_piece_that_does_not_continue_the_cut_is_refused_and_an_idle_cut_is_forgotten(tiny_models, two_utterances):
    now = [0.0]
    vad = VadCore(tiny_models.vad, VadSettings(session_idle_s=60), clock=lambda: now[0])
    assert vad.segment_piece("f", two_utterances[:16000], 0, final=False) == []
    assert vad.segment_piece("f", two_utterances[16000:32000], 999, final=False) is None  # a gap: start over
    assert vad.segment_piece("g", two_utterances[:16000], 1000, final=False) is None  # a stranger (new replica)
    assert vad.segment_piece("h", two_utterances[:16000], 0, final=False) == []
    assert vad.drop_file("h") and not vad.drop_file("h")
    vad.segment_piece("left", two_utterances[:16000], 0, final=False)  # its client left; no drop came
    now[0] = 61.0
    vad.evict_idle()
    assert not vad._files


def test_vad_reset_keeps_the_session_cache_from_growing(tiny_models, two_utterances):
    """fsmn keeps one output_data_buf entry per segment it ever found; resets drop them."""

    def segments_held(reset_after_ms: int) -> int:
        vad = VadCore(tiny_models.vad, VadSettings(max_end_silence_ms=600, reset_after_ms=reset_after_ms))
        audio = np.concatenate([two_utterances] * 8)
        for i in range(0, len(audio), 3200):
            vad.feed("s", audio[i : i + 3200], i // 16)
        return len(vad._streams["s"].cache["stats"].output_data_buf)

    assert segments_held(reset_after_ms=10**9) >= 14  # without resets: grows with the session
    assert segments_held(reset_after_ms=5000) <= 2


def test_vad_batched_step_keeps_sessions_apart_and_fails_a_bad_chunk_alone(vad, two_utterances):
    """feed_many (one VADHost call for a lane) gives each session what feed alone gives it; a chunk
    that raises gets an error result, and the rest of its batch goes on."""
    from speech_serve.messages import VadChunk, VadItem

    step, events = 200 * 16, {"m": [], "n": []}
    for i in range(0, len(two_utterances), step):
        final = i + step >= len(two_utterances)
        chunk = VadChunk(two_utterances[i : i + step], i // 16, final=final)
        bad = VadItem("bad", VadChunk(None, 0)) if i == 0 else VadItem("bad", None)
        results = vad.feed_many([VadItem("m", chunk), bad, VadItem("n", chunk)])
        assert results[1].events == [] and (results[1].error is not None) == (i == 0)
        events["m"] += results[0].events
        events["n"] += results[2].events
    assert pairs(events["m"]) == pairs(events["n"]) == pairs(stream(vad, "alone", two_utterances))
    assert vad.live_sessions == 0


def test_vad_forgets_sessions_nobody_has_fed_for_session_idle_s(tiny_models, two_utterances):
    """An Ingress that crashed never sends `final` or a close: its sessions' state must not stay on
    the VADHost for ever (it counts in live_sessions, which drives routing and autoscaling)."""
    from speech_serve.messages import VadChunk, VadItem

    now = [1000.0]
    vad = VadCore(tiny_models.vad, VadSettings(session_idle_s=300), clock=lambda: now[0])
    chunk = two_utterances[:3200]
    vad.feed_many([VadItem("orphan", VadChunk(chunk, 0)), VadItem("alive", VadChunk(chunk, 0))])
    now[0] += 200
    vad.feed_many([VadItem("alive", VadChunk(chunk, 200))])
    assert vad.live_sessions == 2
    now[0] += 150  # orphan: 350 s without audio; alive: 150 s
    assert vad.live_sessions == 1  # stats are right before any call comes (all callers may be gone)
    vad.feed_many([VadItem("alive", VadChunk(chunk, 400))])
    assert set(vad._streams) == {"alive"}  # its memory is freed at the next call
    # Should the orphan come back after all, it is asked to replay, as after a replica change.
    assert vad.feed("orphan", chunk, 200).state_lost


@pytest.mark.parametrize("sessions, expected", [(0, 1), (1, 1), (50, 1), (51, 2), (100, 2), (101, 3), (499.5, 10)])
def test_replicas_for_sessions(sessions, expected):
    assert replicas_for_sessions(sessions, 50) == expected


def sized(per_replica: float, *replicas: str) -> dict[str, dict[str, float]]:
    """What each replica reports it is sized for (vad.sessions_per_replica)."""
    return {"sessions_per_replica": {r: per_replica for r in replicas}}


def test_policy_sums_sessions_over_replicas():
    policy = SessionsPolicy()
    decision, state = policy(ctx({"live_sessions": {"r1": 9.0, "r2": 12.0, "r3": 4.0}, **sized(10, "r1", "r2", "r3")}))
    assert decision == 3 and state == {"live_sessions": 25.0}
    assert policy(ctx({"live_sessions": {"r1": 0.0}, **sized(10, "r1")}))[0] == 1


def test_policy_keeps_the_target_until_replicas_report():
    assert SessionsPolicy()(ctx(None, target=3)) == (3, {})
    assert SessionsPolicy()(ctx({"other": {"r1": 1.0}}, target=2)) == (2, {})
    assert SessionsPolicy()(ctx({"live_sessions": {"r1": 40.0}}, target=2)) == (2, {})  # nor its size yet


def test_the_target_per_replica_is_the_size_the_replicas_report():
    """vad.sessions_per_replica, one setting: the Ingress's lane size and, reported by each replica,
    the policy's target; no policy_kwargs to keep in step with it."""
    policy = SessionsPolicy()
    assert policy(ctx({"live_sessions": {"r1": 60.0}, **sized(50, "r1")}))[0] == 2
    assert policy(ctx({"live_sessions": {"r1": 60.0}, **sized(100, "r1")}))[0] == 1
    with pytest.raises(TypeError):
        SessionsPolicy(sessions_per_replica=10)  # the old policy_kwargs: refused, not silently ignored

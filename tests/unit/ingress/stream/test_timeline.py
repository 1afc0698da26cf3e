"""The timeline (stream/timeline.py), pure: VAD chunks, utterances cut from the VAD's events or by
the client, speech edges, replays, and the audio buffer's cost."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from speech_serve.ingress.stream.timeline import SpeechEdge, Timeline, utterances_of
from speech_serve.messages import VadEvent


def tone(ms: int, value: int = 1000) -> np.ndarray:
    return np.full(ms * 16, value, dtype=np.int16)


def chunk_end(chunk) -> int:
    return chunk.start_ms + len(chunk.pcm) // 16


def test_tiny_frames_cost_the_timeline_linear_work():
    """Before: each frame copied the whole utterance buffer (quadratic: 3 s in 16-sample frames
    allocated 144 MB). Now the bytes allocated while taking a frame do not grow with the buffer."""
    timeline = Timeline(vad_chunk_ms=200, max_utterance_ms=30_000)
    frame = np.ones(16, dtype=np.int16)
    frames = 3 * 16_000 // 16
    allocated = 0
    tracemalloc.start()
    try:
        for _ in range(frames):
            before, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            timeline.add_audio(frame)  # no VAD events: the utterance buffer keeps everything
            _, peak = tracemalloc.get_traced_memory()
            allocated += peak - before
    finally:
        tracemalloc.stop()
    total = frames * frame.nbytes
    assert timeline.buffered_ms == 3000
    assert allocated < 8 * total + 1_000_000, (allocated, total)


def test_the_timeline_hands_out_the_same_audio_as_before():
    """Chunks, replays and cut utterances carry exactly the samples pushed, whatever the frame sizes."""
    rng = np.random.default_rng(1)
    audio = rng.integers(-30000, 30000, 16_000 * 4, dtype=np.int16)
    timeline = Timeline(vad_chunk_ms=200, max_utterance_ms=30_000, idle_keep_ms=0)
    chunks, at = [], 0
    while at < len(audio):
        n = int(rng.integers(1, 5000))
        chunks += timeline.add_audio(audio[at : at + n])
        at += n
    assert np.array_equal(np.concatenate([c.pcm for c in chunks]), audio[: len(chunks) * 3200])
    assert np.array_equal(timeline.replay_chunk().pcm, audio[: len(chunks) * 3200])
    (utt,) = timeline.on_vad_events([VadEvent("start", 500), VadEvent("end", 2500)])
    assert np.array_equal(utt.pcm, audio[8000:40000])
    timeline.add_audio(audio[:100])  # later audio never changes what was handed out
    assert np.array_equal(utt.pcm, audio[8000:40000]) and np.array_equal(chunks[0].pcm, audio[:3200])


def test_audio_is_sent_to_vad_in_chunks_of_at_least_vad_chunk_ms():
    s = Timeline(vad_chunk_ms=200, max_utterance_ms=30_000)
    assert s.add_audio(tone(60)) == []
    assert s.add_audio(tone(60)) == []
    assert s.add_audio(tone(60)) == []
    chunks = s.add_audio(tone(60))  # 240 ms received: one 200 ms chunk, 40 ms pending
    assert [(c.start_ms, len(c.pcm)) for c in chunks] == [(0, 200 * 16)]
    final = s.flush()
    assert (final.start_ms, len(final.pcm), final.final) == (200, 40 * 16, True)


def test_start_and_end_events_cut_the_utterance_from_the_buffer():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000)
    audio = np.arange(1000 * 16, dtype=np.int32).astype(np.int16)  # sample i identifies its position
    s.add_audio(audio)
    done = s.on_vad_events([VadEvent("start", 300), VadEvent("end", 700)])
    assert len(done) == 1
    utt = done[0]
    assert (utt.index, utt.start_ms, utt.end_ms, utt.forced_cut) == (0, 300, 700, False)
    assert np.array_equal(utt.pcm, audio[300 * 16 : 700 * 16])


def test_utterances_are_numbered_and_each_slice_is_its_own():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000)
    s.add_audio(tone(500, 1))
    first = s.on_vad_events([VadEvent("start", 100), VadEvent("end", 300)])
    s.add_audio(tone(500, 2))
    second = s.on_vad_events([VadEvent("start", 600), VadEvent("end", 900)])
    assert [u.index for u in first + second] == [0, 1]
    assert set(second[0].pcm.tolist()) == {2}
    assert (second[0].start_ms, second[0].end_ms) == (600, 900)


def test_start_and_end_in_separate_calls():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000)
    s.add_audio(tone(400))
    assert s.on_vad_events([VadEvent("start", 150)]) == []
    s.add_audio(tone(400))
    (utt,) = s.on_vad_events([VadEvent("end", 650)])
    assert (utt.start_ms, utt.end_ms, len(utt.pcm)) == (150, 650, 500 * 16)


def test_long_speech_is_force_cut_and_continues():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=1000)
    s.add_audio(tone(600))
    assert s.on_vad_events([VadEvent("start", 0)]) == []
    s.add_audio(tone(600))  # VAD has 1200 ms now
    (cut,) = s.on_vad_events([])
    assert (cut.start_ms, cut.end_ms, cut.forced_cut) == (0, 1200, True)
    s.add_audio(tone(300))
    (rest,) = s.on_vad_events([VadEvent("end", 1400)])
    assert (rest.start_ms, rest.end_ms, rest.forced_cut) == (1200, 1400, False)


def test_idle_audio_is_trimmed_so_the_buffer_stays_small():
    s = Timeline(vad_chunk_ms=200, max_utterance_ms=30_000, idle_keep_ms=1000)
    for _ in range(100):  # 20 s of silence
        s.add_audio(tone(200, 0))
        s.on_vad_events([])
    assert s.buffered_ms <= 1200 + 200


def test_replay_covers_the_unfinished_audio_and_restarts():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000)
    s.add_audio(tone(500, 1))
    s.on_vad_events([VadEvent("start", 100), VadEvent("end", 300)])  # buffer now starts at 300
    s.add_audio(tone(400, 2))
    s.on_vad_events([VadEvent("start", 600)])
    replay = s.replay_chunk()
    assert replay.restart and replay.start_ms == 300
    assert len(replay.pcm) == (s.sent_ms - 300) * 16
    assert s.speech_start_ms is None  # the new VAD state reports the start again
    (utt,) = s.on_vad_events([VadEvent("start", 610), VadEvent("end", 850)])
    assert (utt.start_ms, utt.end_ms) == (610, 850)


def test_end_without_start_uses_the_buffer_start():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000)
    s.add_audio(tone(300))
    (utt,) = s.on_vad_events([VadEvent("end", 250)])
    assert (utt.start_ms, utt.end_ms) == (0, 250)


def test_no_audio_after_finish():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000)
    s.flush()
    with pytest.raises(RuntimeError):
        s.add_audio(tone(10))


def test_push_to_talk_takes_everything_between_start_and_stop():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000)
    s.add_audio(tone(300, 1))  # before the button: not part of the utterance
    s.begin_manual()
    s.add_audio(tone(250, 2))
    for _ in s.add_audio(tone(10, 2)):
        pass
    utt = s.end_manual()
    assert (utt.start_ms, utt.end_ms, set(utt.pcm.tolist())) == (300, 560, {2})
    assert s.end_manual() is None  # nothing new since
    (chunk,) = s.add_audio(tone(100))
    assert chunk.restart and chunk.start_ms == 560  # the VAD starts afresh after push-to-talk


def test_abort_drops_the_utterance_in_progress():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000)
    s.add_audio(tone(400))
    s.on_vad_events([VadEvent("start", 100)])
    assert s.speech_so_far()[0] == 0 and len(s.speech_so_far()[1]) == 300 * 16
    s.abort()
    assert s.speech_so_far() is None and s.buffered_ms == 0
    (chunk,) = s.add_audio(tone(100))
    assert chunk.restart and chunk.start_ms == 400
    (utt,) = s.on_vad_events([VadEvent("start", 420), VadEvent("end", 480)])
    assert (utt.index, utt.start_ms) == (0, 420)  # nothing of the aborted speech is left


def test_a_vad_end_at_a_force_cut_gives_no_empty_utterance():
    """A VAD end at or before a force-cut used to make a 0-sample utterance; funasr's fbank raises on
    it, and the whole model batch (other sessions' utterances too) failed with it."""
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=1000, min_utterance_ms=50)
    s.add_audio(tone(600))
    s.on_vad_events([VadEvent("start", 0)])
    s.add_audio(tone(600))
    (cut,) = s.on_vad_events([])
    assert (cut.index, cut.end_ms, cut.forced_cut) == (0, 1200, True)
    assert s.on_vad_events([VadEvent("end", 1150)]) == []  # nothing is left after the cut: dropped
    assert s.speech_start_ms is None and s.dropped == 1
    s.add_audio(tone(500))
    (nxt,) = s.on_vad_events([VadEvent("start", 1300), VadEvent("end", 1600)])
    assert nxt.index == 1  # indices stay contiguous: the client never sees a gap


def test_utterances_shorter_than_the_minimum_are_dropped_everywhere():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000, min_utterance_ms=50)
    s.add_audio(tone(500))
    assert s.on_vad_events([VadEvent("start", 100), VadEvent("end", 130)]) == []  # 30 ms: a click
    (kept,) = s.on_vad_events([VadEvent("start", 200), VadEvent("end", 250)])  # 50 ms: kept
    assert (kept.index, len(kept.pcm)) == (0, 50 * 16)
    s.begin_manual()  # push-to-talk released after 20 ms
    s.add_audio(tone(20))
    assert s.end_manual() is None
    s.add_audio(tone(300))
    s.on_vad_events([VadEvent("start", s.sent_ms - 10)])
    assert s.speech_so_far() is None  # no interim for 10 ms of audio either
    pcm = tone(1000)
    assert [(u.start_ms, u.end_ms) for u in utterances_of(pcm, [(0, 0), (10, 40), (100, 400)], 50)] == [(100, 400)]


def test_one_big_frame_many_chunks_keeps_a_later_utterance_whole():
    """A 2 s frame makes ten VAD chunks; their events come back one chunk at a time. Idle trimming
    after the first chunk must count from what the VAD has seen (200 ms), not from all that was
    sent (2000 ms): else a start the VAD reports later, for 500 ms, finds its audio gone."""
    s = Timeline(vad_chunk_ms=200, max_utterance_ms=30_000, idle_keep_ms=1000)
    audio = np.arange(2000 * 16, dtype=np.int32).astype(np.int16)
    chunks = s.add_audio(audio)
    assert len(chunks) == 10
    events = {4: [VadEvent("start", 500)], 8: [VadEvent("end", 1500)]}  # lookback: the start is reported late
    done = []
    for i, chunk in enumerate(chunks):
        done += s.on_vad_events(events.get(i, []), upto_ms=chunk_end(chunk))
    (utt,) = done
    assert (utt.start_ms, utt.end_ms) == (500, 1500)
    assert np.array_equal(utt.pcm, audio[500 * 16 : 1500 * 16])


def test_replay_stops_at_the_chunk_being_fed():
    """A replay rebuilds the VAD state up to the chunk that failed, not past it: the chunks after
    it are still to be sent, and would reach the VAD twice."""
    s = Timeline(vad_chunk_ms=200, max_utterance_ms=30_000)
    chunks = s.add_audio(tone(1000))
    s.on_vad_events([], upto_ms=chunk_end(chunks[0]))
    replay = s.replay_chunk(chunks[1])
    assert (replay.start_ms, chunk_end(replay), replay.restart, replay.final) == (0, 400, True, False)


def test_force_cut_counts_from_what_the_vad_has_seen():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=1000)
    chunks = s.add_audio(tone(1500))
    assert s.on_vad_events([VadEvent("start", 0)], upto_ms=chunk_end(chunks[0])) == []
    cuts = []
    for chunk in chunks[1:]:
        cuts += s.on_vad_events([], upto_ms=chunk_end(chunk))
    assert [(c.start_ms, c.end_ms, c.forced_cut) for c in cuts] == [(0, 1000, True)]


def test_vad_edges_frame_each_utterance_once_even_after_a_replay():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000, min_utterance_ms=50)
    s.add_audio(tone(500))
    s.on_vad_events([VadEvent("start", 100)])
    s.replay_chunk()  # a new VAD replica reports the same start again: no second `started`
    s.on_vad_events([VadEvent("start", 110)])
    s.add_audio(tone(500))
    s.on_vad_events([VadEvent("end", 700), VadEvent("start", 800), VadEvent("end", 820)])  # the last: too short
    assert s.take_edges() == [
        SpeechEdge("started", 100), SpeechEdge("stopped", 700, 0, 110),  # cut from the replayed start
        SpeechEdge("started", 800), SpeechEdge("stopped", 820, None, 800),
    ]  # fmt: skip
    assert s.take_edges() == []


def test_a_forced_cut_stops_and_starts_again_and_push_to_talk_is_cut():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=1000)
    s.add_audio(tone(1200))
    s.on_vad_events([VadEvent("start", 0)])
    assert s.take_edges() == [SpeechEdge("started", 0), SpeechEdge("stopped", 1200, 0, 0), SpeechEdge("started", 1200)]
    s.add_audio(tone(200))
    s.end_manual()  # a commit while the VAD hears speech: cut, no `stopped`
    assert s.take_edges() == [SpeechEdge("cut", 1400, 1, 1200)]
    s.begin_manual()
    s.add_audio(tone(300))
    s.on_vad_events([])
    s.end_manual()
    assert s.take_edges() == [SpeechEdge("cut", 1700, 2, 1400)]
    s.begin_manual()
    s.end_manual()  # nothing since: no edge
    assert s.take_edges() == []


def test_chunks_carry_the_streams_end_silence():
    s = Timeline(vad_chunk_ms=100, max_utterance_ms=30_000)
    (chunk,) = s.add_audio(tone(100))
    assert chunk.end_silence_ms is None  # the VADHost's own
    s.end_silence_ms = 400
    (chunk,) = s.add_audio(tone(100))
    assert chunk.end_silence_ms == 400 and s.replay_chunk().end_silence_ms == 400

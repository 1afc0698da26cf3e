"""The VAD benchmark runs the VADHost's real step and counts what it finds (make bench-vad)."""

from speech_serve.loadtest import bench_vad
from speech_serve.replicas.vad import VadCore
from speech_serve.settings import VadSettings


def test_it_feeds_every_session_chunk_by_chunk_and_finds_the_speech(tiny_models):
    core = VadCore(tiny_models.vad, VadSettings(max_end_silence_ms=800, threads=1))
    audio = bench_vad.session_audio(sessions=2, utterances=2)
    spent, chunks, events = bench_vad.run(core, audio, chunk=3200)
    assert chunks == 2 * (min(len(a) for a in audio) // 3200) and spent > 0
    assert events >= 4  # a start and an end for most of the 4 utterances
    assert core.live_sessions == 0  # closed after the run
    assert bench_vad.run(core, audio, chunk=3200)[2] == events  # the same speech every run

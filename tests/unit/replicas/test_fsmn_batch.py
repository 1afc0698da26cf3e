"""The batched fsmn-vad step gives every session exactly what `AutoModel.generate` gives it alone
(real fsmn-vad weights, interleaved sessions, finals, odd chunk lengths), and a bad chunk fails alone.
The reference is a model of its own: BatchedFsmnVad replaces methods of the model it wraps."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from funasr.models.fsmn_vad_streaming.model import FrameState

from speech_serve.messages import to_float32
from speech_serve.replicas.fsmn_batch import BatchedFsmnVad, Step
from speech_serve.replicas.models import load_automodel
from speech_serve.wire.pcm import SAMPLES_PER_MS

CORPUS = Path(__file__).parents[3] / "loadtest" / "corpus"


@pytest.fixture(scope="module")
def automodel(tiny_models):
    return load_automodel(tiny_models.vad, device="cpu", threads=1, max_end_silence_time=800)


@pytest.fixture(scope="module")
def reference(tiny_models):
    """funasr's own code, never wrapped."""
    return load_automodel(tiny_models.vad, device="cpu", threads=1, max_end_silence_time=800)


@pytest.fixture(scope="module")
def streams(two_utterances):
    """Five sessions' audio: speech and pauses of different lengths, so their frames fall apart."""
    clips = [sf.read(p, dtype="int16")[0] for p in sorted(CORPUS.glob("*.wav"))[:8]]
    gap = np.zeros(16 * 1300, dtype=np.int16)
    audio = [two_utterances]
    for k in range(4):
        audio.append(np.concatenate([gap[: 16 * (300 + 170 * k)], clips[2 * k], gap, clips[2 * k + 1], gap]))
    return audio


def chunks(pcm: np.ndarray, chunk: int) -> list[np.ndarray]:
    return [pcm[i : i + chunk] for i in range(0, len(pcm), chunk)]


def through_generate(automodel, pcm: np.ndarray, chunk: int, **options) -> list[list[list[int]]]:
    """What VadCore did before: one generate() per chunk (the reference); `options` for generate."""
    cache: dict = {}
    out = []
    parts = chunks(pcm, chunk)
    for n, part in enumerate(parts):
        res = automodel.generate(
            input=to_float32(part), cache=cache, is_final=n == len(parts) - 1,
            chunk_size=max(len(part) // SAMPLES_PER_MS, 1), **options,
        )  # fmt: skip
        out.append([list(seg) for seg in (res[0]["value"] if res else [])])
    return out


def batched(engine: BatchedFsmnVad, audio: list[np.ndarray], chunk_sizes: list[int]) -> list[list[list[list[int]]]]:
    """All sessions advanced together, one step each per round, until each has sent its last chunk."""
    parts = [chunks(pcm, size) for pcm, size in zip(audio, chunk_sizes, strict=True)]
    caches: list[dict] = [{} for _ in audio]
    out: list[list] = [[] for _ in audio]
    for r in range(max(len(p) for p in parts)):
        steps = {
            s: Step(caches[s], to_float32(p[r]), final=r == len(p) - 1, chunk_ms=max(len(p[r]) // SAMPLES_PER_MS, 1))
            for s, p in enumerate(parts)
            if r < len(p)
        }
        engine.run(list(steps.values()))
        for s, step in steps.items():
            assert step.error is None
            out[s].append(step.segments)
    return out


def recording(classify, log: list):
    """A GetFrameState that logs (frame, state, noise level after it) for each frame it classifies."""

    def frame_state(t, cache=None):
        state = classify(t, cache)
        log.append((t, state, cache["stats"].noise_average_decibel))
        return state

    return frame_state


def test_batched_steps_match_generate_session_by_session(automodel, reference, streams):
    chunk_sizes = [3200, 3200, 3200, 3200, 3200 + 48]  # 200 ms; one session with an odd length
    expected = [through_generate(reference, pcm, size) for pcm, size in zip(streams, chunk_sizes, strict=True)]
    assert sum(1 for session in expected for segs in session for seg in segs if seg[1] != -1) >= 9  # utterances ended

    engine = BatchedFsmnVad(automodel)
    widths = []
    real_forward = automodel.model.encoder.forward
    automodel.model.encoder.forward = lambda feats, cache=None: widths.append(feats.shape[0]) or real_forward(
        feats, cache
    )
    try:
        got = batched(engine, streams, chunk_sizes)
    finally:
        del automodel.model.encoder.forward
    assert got == expected
    assert max(widths) >= 4 and widths.count(1) < len(widths) / 2  # most frames went through shared forwards


def test_a_bad_chunk_fails_alone(automodel, streams):
    engine = BatchedFsmnVad(automodel)
    good = [{}, {}, {}]
    bad: dict = {}
    for r in range(3):  # warm every encoder cache so the batch below is shared
        engine.run([Step(c, to_float32(streams[i][r * 3200 : (r + 1) * 3200]), False, 200) for i, c in enumerate(good)])
    broken = Step(bad, None, False, 200)  # type: ignore[arg-type]  # no audio at all
    steps = [Step(c, to_float32(streams[i][9600:12800]), False, 200) for i, c in enumerate(good)]
    engine.run([*steps[:2], broken, steps[2]])
    assert broken.error is not None
    assert all(step.error is None for step in steps)


def test_needs_a_fixed_end_silence(tiny_models):
    with pytest.raises(ValueError, match="max_end_silence_time"):
        BatchedFsmnVad(load_automodel(tiny_models.vad, device="cpu", threads=1))


def test_each_session_keeps_its_own_end_silence(automodel, reference, two_utterances):
    """Sessions of one batch with different end silences (a Realtime client's silence_duration_ms)
    each get what generate() gives with that silence as the model's option."""
    silences = (300, 1200)
    expected = {ms: through_generate(reference, two_utterances, 3200, max_end_silence_time=ms) for ms in silences}
    ends = {ms: [r for r, segs in enumerate(out) for seg in segs if seg[1] != -1] for ms, out in expected.items()}
    assert ends[300][0] < ends[1200][0]  # the shorter silence ends the first utterance sooner
    engine = BatchedFsmnVad(automodel)  # the model's own option stays 800: never used below
    parts = chunks(two_utterances, 3200)
    caches: dict[int, dict] = {ms: {} for ms in silences}
    got: dict[int, list] = {ms: [] for ms in silences}
    for r, part in enumerate(parts):
        final, chunk_ms = r == len(parts) - 1, max(len(part) // SAMPLES_PER_MS, 1)
        steps = {ms: Step(caches[ms], to_float32(part), final, chunk_ms, end_silence_ms=ms) for ms in silences}
        engine.run(list(steps.values()))
        for ms, step in steps.items():
            assert step.error is None
            got[ms].append(step.segments)
    assert got == expected


def test_each_frame_is_classified_as_funasr_classifies_it(automodel, reference, streams, monkeypatch):
    """Our frame classifier (a float list, not a tensor per frame) against funasr's, frame by frame."""
    engine = BatchedFsmnVad(automodel)
    theirs: list = []
    ours: list = []
    funasrs = reference.model.GetFrameState  # the bound method of funasr's class
    monkeypatch.setattr(reference.model, "GetFrameState", recording(funasrs, theirs))
    monkeypatch.setattr(automodel.model, "GetFrameState", recording(engine._frame_state, ours))
    for pcm in streams:
        theirs.clear(), ours.clear()
        through_generate(reference, pcm, 3200)
        batched(engine, [pcm], [3200])
        assert len(ours) > 100 and ours == theirs
        assert {state for _, state, _ in ours} == {FrameState.kFrameStateSil, FrameState.kFrameStateSpeech}


def test_whole_files_are_segmented_as_before_with_the_engine_in_place(automodel, reference, streams):
    """generate() still works on the model the engine has wrapped (the reference the upload cut is held to)."""
    BatchedFsmnVad(automodel)
    for pcm in streams:
        ours = automodel.generate(input=to_float32(pcm), cache={}, is_final=True)[0]["value"]
        assert ours == reference.generate(input=to_float32(pcm), cache={}, is_final=True)[0]["value"]
        assert ours

"""Our batched streaming features are funasr's `WavFrontendOnline` features, chunk by chunk: the
same frames at the same moments with the very samples they were computed from, for any chunk
lengths, a stream's end anywhere, and many sessions in one call; a bad piece fails alone."""

import numpy as np
import pytest
import torch
from funasr.utils.load_utils import extract_fbank

from speech_serve.messages import to_float32
from speech_serve.replicas import fast_fbank
from speech_serve.replicas.models import load_automodel
from speech_serve.replicas.vad_frontend import OnlineFeatures, Piece, supports

# lengths around the frame (400 samples) and shift (160), the VADHost's 200 ms chunks, odd ones
LENGTHS = [1, 50, 160, 399, 400, 401, 559, 560, 800, 3200, 3248, 4321]


@pytest.fixture(scope="module")
def frontend(tiny_models):
    fast_fbank.install()  # as the VADHost runs funasr's frontend
    return load_automodel(tiny_models.vad, device="cpu", threads=1, max_end_silence_time=800).kwargs["frontend"]


@pytest.fixture(scope="module")
def audio(two_utterances) -> torch.Tensor:
    return torch.from_numpy(to_float32(two_utterances))


def funasr_features(frontend, cache: dict, piece: torch.Tensor, final: bool) -> tuple[torch.Tensor, torch.Tensor]:
    feats, _ = extract_fbank([piece], data_type="sound", frontend=frontend, cache=cache, is_final=final,
                             return_waveform=True)  # fmt: skip
    return feats, cache.get("aligned_waveforms")


def streams(audio: torch.Tensor, count: int, seed: int) -> list[list[torch.Tensor]]:
    """`count` streams cut from the fixture (silence, onsets, speech) into random chunk lengths;
    some end with an empty chunk, as a client that says "done" after its last audio."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        length = int(rng.integers(0, 24_000))
        start = int(rng.integers(0, len(audio) - length))
        cuts, pos = [], start
        while pos < start + length:
            size = min(int(rng.choice(LENGTHS)), start + length - pos)
            cuts.append(audio[pos : pos + size])
            pos += size
        if not cuts or rng.random() < 0.3:
            cuts.append(audio[:0])
        out.append(cuts)
    return out


def test_it_mirrors_fsmn_vads_frontend(frontend):
    assert supports(frontend)
    frontend.lfr_n, kept = 2, frontend.lfr_n
    try:
        assert not supports(frontend)  # funasr's own frontend runs for what this does not mirror
    finally:
        frontend.lfr_n = kept


def test_one_session_at_a_time_is_exactly_funasrs(frontend, audio):
    ours = OnlineFeatures(frontend)
    compared = 0
    for chunks in streams(audio, 120, seed=1):
        theirs_cache: dict = {}
        state: dict = {}
        for k, chunk in enumerate(chunks):
            final = k == len(chunks) - 1
            feats, waveform = funasr_features(frontend, theirs_cache, chunk, final)
            piece = Piece(state, chunk, final)
            ours.features([piece])
            assert piece.error is None
            assert piece.feats.shape[-2:] == feats.shape[-2:] or feats.numel() == piece.feats.numel() == 0
            if feats.numel():
                assert torch.equal(piece.feats, feats)
                assert torch.equal(piece.waveform, waveform)
                compared += 1
    assert compared > 500


def test_many_sessions_in_one_call(frontend, audio):
    """All sessions' frames share one FFT and one matmul: the same features to float rounding."""
    ours = OnlineFeatures(frontend)
    sessions = streams(audio, 12, seed=2)
    theirs = [{} for _ in sessions]
    states: list[dict] = [{} for _ in sessions]
    compared = 0
    for r in range(max(len(c) for c in sessions)):
        live = [s for s, chunks in enumerate(sessions) if r < len(chunks)]
        pieces = [Piece(states[s], sessions[s][r], r == len(sessions[s]) - 1) for s in live]
        expected = [funasr_features(frontend, theirs[s], p.samples, p.final) for s, p in zip(live, pieces, strict=True)]
        ours.features(pieces)
        for piece, (feats, waveform) in zip(pieces, expected, strict=True):
            assert piece.error is None and piece.feats.numel() == feats.numel()
            if feats.numel():
                assert float((piece.feats - feats).abs().max()) < 1e-4
                assert torch.equal(piece.waveform, waveform)
                compared += 1
    assert compared > 50


def test_a_bad_piece_fails_alone(frontend, audio):
    ours = OnlineFeatures(frontend)
    good = [Piece({}, audio[i * 3200 : (i + 1) * 3200], False) for i in range(3)]
    bad = Piece({}, None, False)  # type: ignore[arg-type]  # no audio at all
    ours.features([good[0], bad, *good[1:]])
    assert bad.error is not None and bad.feats.numel() == 0
    # a first 200 ms: 18 whole fbank frames, of which the last 2 wait for the frames after them
    assert all(p.error is None and p.feats.shape == (1, 16, 400) for p in good)


def test_a_piece_that_breaks_the_shared_fbank_fails_alone(frontend, audio, monkeypatch):
    """One fbank call for every session's frames: when it raised, every session of the call failed
    (and each closed with 1011). Now the call is redone piece by piece and only the culprit fails."""
    real = fast_fbank.fbank_of_frames

    def fragile(frames, *args):
        if bool((frames.abs() > 30_000).any()):  # a poisoned piece (int16-scaled samples near full scale)
            raise RuntimeError("fbank failed")
        return real(frames, *args)

    alone = OnlineFeatures(frontend)
    expected = [Piece({}, audio[i * 3200 : (i + 1) * 3200], False) for i in range(3)]
    alone.features(expected)
    monkeypatch.setattr(fast_fbank, "fbank_of_frames", fragile)
    ours = OnlineFeatures(frontend)
    good = [Piece({}, audio[i * 3200 : (i + 1) * 3200], False) for i in range(3)]
    bad = Piece({}, torch.ones(3200), False)
    ours.features([good[0], bad, *good[1:]])
    assert isinstance(bad.error, RuntimeError) and bad.feats.numel() == 0
    for piece, reference in zip(good, expected, strict=True):
        assert piece.error is None and torch.equal(piece.feats, reference.feats)

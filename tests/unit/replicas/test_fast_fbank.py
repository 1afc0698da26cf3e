"""Our fbank gives kaldi-native-fbank's features (what funasr uses without torchaudio), and
fsmn-vad finds exactly the same speech with it; anything it does not implement goes to funasr's."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from funasr.frontends import wav_frontend
from funasr.utils import fbank as funasr_fbank

from speech_serve.messages import to_float32
from speech_serve.replicas import fast_fbank
from speech_serve.replicas.models import load_automodel

CORPUS = Path(__file__).parents[3] / "loadtest" / "corpus"
FSMN_OPTIONS = dict(num_mel_bins=80, frame_length=25, frame_shift=10, dither=0.0, energy_floor=0.0,
                    window_type="hamming", sample_frequency=16000)  # fmt: skip


@pytest.fixture(scope="module")
def speech(two_utterances) -> torch.Tensor:
    return torch.from_numpy(two_utterances.astype(np.float32))  # int16 scale, as the frontend passes it


@pytest.mark.parametrize("window", ["hamming", "povey", "hanning", "rectangular"])
@pytest.mark.parametrize("samples", [399, 400, 559, 560, 3440, 16000 * 2 + 77])
def test_the_features_are_kaldi_native_fbanks(speech, window, samples):
    for offset in (0, 17_000, 30_000):  # silence, speech onset, speech
        wave = speech[offset : offset + samples][None]
        ours = fast_fbank.fbank(wave, **{**FSMN_OPTIONS, "window_type": window})
        theirs = funasr_fbank._fbank_knf(wave, **{**FSMN_OPTIONS, "window_type": window})
        assert ours.shape == theirs.shape and ours.dtype == torch.float32
        if theirs.numel():
            # log-mel; float32 FFTs of different libraries differ in the last bits
            assert float((ours - theirs).abs().max()) < 2e-3


def test_what_it_does_not_implement_goes_to_funasr(speech, monkeypatch):
    calls = []
    monkeypatch.setattr(fast_fbank, "_ORIGINAL", lambda w, **o: calls.append(o) or torch.zeros(1, 80))
    wave = speech[:3440][None]
    fast_fbank.fbank(wave, **{**FSMN_OPTIONS, "dither": 1.0})
    fast_fbank.fbank(wave, **FSMN_OPTIONS, snip_edges=False)
    fast_fbank.fbank(wave, **FSMN_OPTIONS, use_energy=True)
    fast_fbank.fbank(torch.zeros(2, 3440), **FSMN_OPTIONS)
    assert len(calls) == 4
    fast_fbank.fbank(wave, **FSMN_OPTIONS)
    assert len(calls) == 4


def test_fsmn_vad_finds_the_same_speech_with_it(tiny_models, two_utterances, monkeypatch):
    """Streaming (200 ms chunks) and whole-file, on the fixture and corpus clips with pauses."""
    automodel = load_automodel(tiny_models.vad, device="cpu", threads=1, max_end_silence_time=800)
    gap = np.zeros(16 * 900, dtype=np.int16)
    clips = [sf.read(p, dtype="int16")[0] for p in sorted(CORPUS.glob("*.wav"))[:6]]
    audio = [two_utterances, np.concatenate([x for clip in clips for x in (gap, clip)] + [gap])]

    def segments() -> list:
        found = []
        for pcm in audio:
            found.append(automodel.generate(input=to_float32(pcm), cache={}, is_final=True)[0]["value"])
            cache: dict = {}
            parts = [pcm[i : i + 3200] for i in range(0, len(pcm), 3200)]
            for n, part in enumerate(parts):
                out = automodel.generate(input=to_float32(part), cache=cache, is_final=n == len(parts) - 1,
                                         chunk_size=200)  # fmt: skip
                found.append(out[0]["value"] if out else [])
        return found

    monkeypatch.setattr(wav_frontend, "kaldi", funasr_fbank)
    reference = segments()
    fast_fbank.install()
    assert wav_frontend.kaldi is fast_fbank._Module
    assert segments() == reference
    assert sum(len(s) for s in reference) >= 8  # speech was found: the comparison means something

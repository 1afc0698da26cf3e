"""Kaldi fbank features in torch, for the VADHost's 200 ms streaming chunks.

funasr computes fbank through torchaudio or, without it (our install), kaldi-native-fbank, and
builds a new extractor (options, window, mel banks) for every call. A VADHost runs that once per
session per 200 ms chunk, for ~20 frames: measured in the sweep's VADHost profile, a quarter of
its CPU went there (about 1 ms per chunk), nearly all of it per-call set-up. This computes the
same features with the window and mel banks built once per option set.

It implements the options funasr's frontends pass with dither 0 (Kaldi's defaults otherwise);
any other option, or dither, goes to funasr's own fbank. tests/unit/replicas/test_fast_fbank.py
checks it against kaldi-native-fbank and that fsmn-vad finds the same segments with it.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from funasr.frontends import wav_frontend
from funasr.utils import fbank as funasr_fbank

_EPSILON = float(np.finfo(np.float32).eps)  # Kaldi's log floor
_HANDLED = {"num_mel_bins", "frame_length", "frame_shift", "dither", "energy_floor", "window_type",
            "sample_frequency", "snip_edges"}  # fmt: skip


# Kaldi's windows over the samples n = 0..size-1 of a frame
WINDOWS = {
    "hamming": lambda n, size: 0.54 - 0.46 * np.cos(2 * np.pi * n / (size - 1)),
    "hanning": lambda n, size: 0.5 - 0.5 * np.cos(2 * np.pi * n / (size - 1)),
    "povey": lambda n, size: (0.5 - 0.5 * np.cos(2 * np.pi * n / (size - 1))) ** 0.85,
    "rectangular": lambda n, size: np.ones(size),
}


def _mel(freq: np.ndarray | float) -> np.ndarray | float:
    return 1127.0 * np.log(1.0 + np.asarray(freq) / 700.0)


@functools.lru_cache(maxsize=16)
def _tables(sample_rate: float, frame_len: int, num_bins: int, window: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(window, mel banks [fft bins x mel bins], FFT size) as Kaldi builds them (low 20 Hz, high Nyquist)."""
    win = WINDOWS[window](np.arange(frame_len), frame_len)
    fft = 1 << (frame_len - 1).bit_length()  # round_to_power_of_two
    fft_bins = fft // 2  # Kaldi leaves out the Nyquist bin
    mel_low, mel_high = _mel(20.0), _mel(sample_rate / 2)
    delta = (mel_high - mel_low) / (num_bins + 1)
    left = mel_low + np.arange(num_bins)[:, None] * delta
    center, right = left + delta, left + 2 * delta
    mel = _mel(np.arange(fft_bins) * sample_rate / fft)[None, :]
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    banks = np.where((mel > left) & (mel < right), np.where(mel <= center, up, down), 0.0)
    return torch.from_numpy(win.astype(np.float32)), torch.from_numpy(np.ascontiguousarray(banks.T, np.float32)), fft


def fbank_frames(
    wave: torch.Tensor, sample_rate: float = 16000.0, frame_length_ms: float = 25.0, frame_shift_ms: float = 10.0,
    num_bins: int = 80, window: str = "povey",
) -> torch.Tensor:
    """Log mel fbank (float32, frames x bins) of one channel, Kaldi's way (snip edges, DC removed,
    pre-emphasis 0.97, power spectrum). In torch: its small matmuls beat numpy's BLAS here."""
    frame_len = int(sample_rate * frame_length_ms / 1000)
    shift = int(sample_rate * frame_shift_ms / 1000)
    wave = wave.reshape(-1).to(torch.float32)
    if len(wave) < frame_len:
        return torch.zeros((0, num_bins), dtype=torch.float32)
    frames = wave.unfold(0, frame_len, shift)  # snip_edges: whole frames only
    return fbank_of_frames(frames, sample_rate, num_bins, window)


def fbank_of_frames(
    frames: torch.Tensor, sample_rate: float = 16000.0, num_bins: int = 80, window: str = "povey"
) -> torch.Tensor:
    """The log mel fbank of frames already cut (frames x samples): each row on its own, so the
    frames of many streams go through in one call (speech_serve/replicas/vad_frontend.py)."""
    frames = frames - frames.mean(dim=1, keepdim=True)
    emphasized = torch.cat((frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]), dim=1)
    win, banks, fft = _tables(float(sample_rate), frames.shape[1], num_bins, window)
    spectrum = torch.fft.rfft(emphasized * win, n=fft)
    power = spectrum.real.square() + spectrum.imag.square()
    return torch.mm(power[:, : fft // 2], banks).clamp_min(_EPSILON).log()


def fbank(waveform: torch.Tensor, **options: Any) -> torch.Tensor:
    """funasr's `fbank(waveform, **options)`: this module's features for what it implements,
    funasr's own for anything else."""
    if (
        set(options) - _HANDLED
        or options.get("dither", 0.0) != 0.0
        or not options.get("snip_edges", True)
        or options.get("window_type", "povey") not in WINDOWS
        or waveform.dim() > 2
        or (waveform.dim() == 2 and waveform.shape[0] != 1)  # one channel only, as funasr's fallback
    ):
        return _ORIGINAL(waveform, **options)
    # energy_floor only matters with use_energy, which funasr's frontends leave off
    return fbank_frames(
        waveform.detach().cpu(), sample_rate=options.get("sample_frequency", 16000.0),
        frame_length_ms=options.get("frame_length", 25.0), frame_shift_ms=options.get("frame_shift", 10.0),
        num_bins=options.get("num_mel_bins", 23), window=options.get("window_type", "povey"),
    )  # fmt: skip


_ORIGINAL = funasr_fbank.fbank


class _Module:
    """What funasr's wav_frontend imports as `kaldi`: only `fbank` is used."""

    fbank = staticmethod(fbank)


def install() -> None:
    """Route funasr's frontends (this process) through this fbank. Idempotent."""
    wav_frontend.kaldi = _Module

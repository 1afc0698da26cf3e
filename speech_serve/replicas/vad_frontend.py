"""fsmn-vad's streaming features for many sessions in one pass.

funasr's `WavFrontendOnline` (fbank, then 5-frame LFR splicing, then CMVN) takes one session's
chunk per call, and most of a call is its own bookkeeping: config deep-copies, padding, tiling the
CMVN vectors, one FFT call per session. In the VADHost's sweep profile it was the largest part of
a VAD step. This computes exactly what it computes, for every session of a batched step at once:
one fbank over all sessions' new frames, one CMVN over all spliced frames.

Per session it keeps what funasr keeps, under `cache["frontend"]` (so funasr's `init_cache`
resets it as before):
- `tail`: the samples after the last whole fbank frame's start (funasr's `input_cache`);
- `context`: the fbank frames the next spliced frames still need (its `lfr_splice_cache`);
- `wave`, `wave_start`, `emitted`: the audio from the first frame not yet scored, so each chunk's
  features come with the exact samples the VAD measures loudness on (its `aligned_waveforms`).

Only funasr's configuration of fsmn-vad is mirrored (`lfr_m` 5, `lfr_n` 1, no dither, snip edges);
`supports()` says whether a frontend is, and speech_serve/replicas/fsmn_batch.py uses funasr's own for any
other. tests/unit/replicas/test_vad_frontend.py checks it against funasr chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from speech_serve.replicas import fast_fbank

_NO_FEATURES = torch.zeros((0,))


@dataclass
class Piece:
    """One session's audio for a step: its state (fsmn-vad's `cache["frontend"]`), float32 samples
    in [-1, 1], and whether it ends the stream. Filled in: `feats` [1, frames, dims] (empty when
    the chunk completes no frame) with `waveform` [1, samples], or `error` (the session's state is
    then unusable; the other pieces go on)."""

    state: dict
    samples: torch.Tensor
    final: bool
    feats: torch.Tensor = _NO_FEATURES
    waveform: torch.Tensor = _NO_FEATURES
    error: Exception | None = None
    _frames: torch.Tensor | None = None  # this chunk's new fbank frames, cut from the samples


def supports(frontend: Any) -> bool:
    """Whether `features` computes exactly what this funasr frontend computes."""
    return (
        type(frontend).__name__ == "WavFrontendOnline"
        and getattr(frontend, "lfr_n", None) == 1
        and getattr(frontend, "lfr_m", None) == 5  # fsmn-vad's, the one tested (funasr fails on lfr_m 1)
        and getattr(frontend, "dither", None) == 0.0
        and getattr(frontend, "snip_edges", False) is True
        and getattr(frontend, "upsacle_samples", False) is True
        and getattr(frontend, "window", None) in fast_fbank.WINDOWS
        and getattr(frontend, "cmvn", None) is not None
    )


class OnlineFeatures:
    def __init__(self, frontend: Any):
        if not supports(frontend):
            raise ValueError("this frontend is not funasr's WavFrontendOnline as fsmn-vad configures it")
        self.rate = float(frontend.fs)
        self.frame = frontend.frame_sample_length
        self.shift = frontend.frame_shift_sample_length
        self.bins = frontend.n_mels
        self.window = frontend.window
        self.splice = frontend.lfr_m  # frames per spliced frame, centred: (splice - 1) // 2 either side
        self.left = (self.splice - 1) // 2
        self.dims = self.bins * self.splice
        cmvn = torch.as_tensor(frontend.cmvn, dtype=torch.float32)
        self.shift_by, self.scale_by = cmvn[0, : self.dims], cmvn[1, : self.dims]

    def features(self, pieces: list[Piece]) -> None:
        """Advance each piece's session by its samples (at most one piece per session)."""
        ready = [piece for piece in pieces if self._attempt(piece, self._cut, piece)]
        cut = [piece for piece in ready if piece._frames is not None]
        if cut:  # one fbank for every session's new frames
            frames = self._shared(cut, [p._frames for p in cut], self._fbank)
            for piece, rows in zip(cut, frames, strict=True):
                piece._frames = rows
        ready = [piece for piece in ready if piece.error is None]
        spliced = [(piece, rows) for piece in ready if (rows := self._attempt(piece, self._splice, piece)) is not None]
        if not spliced:
            return
        normalised = self._shared([p for p, _ in spliced], [rows for _, rows in spliced], self._cmvn)  # one for all
        for (piece, rows), feats in zip(spliced, normalised, strict=True):
            if feats is None:
                continue
            waveform = self._attempt(piece, self._scored_samples, piece.state, len(rows))
            if waveform is not None:
                piece.feats, piece.waveform = feats[None], waveform

    def _fbank(self, frames: torch.Tensor) -> torch.Tensor:
        return fast_fbank.fbank_of_frames(frames, self.rate, self.bins, self.window)

    def _cmvn(self, rows: torch.Tensor) -> torch.Tensor:
        return (rows + self.shift_by) * self.scale_by

    def _shared(self, pieces: list[Piece], inputs: list[torch.Tensor], fn) -> list[torch.Tensor | None]:
        """fn over every piece's input in one call; if that raises, over each alone, so the piece
        that broke it fails alone (None, its error set) and the others' sessions go on."""
        try:
            return list(fn(torch.cat(inputs)).split([len(x) for x in inputs]))
        except Exception:
            return [self._attempt(piece, fn, x) for piece, x in zip(pieces, inputs, strict=True)]

    @staticmethod
    def _attempt(piece: Piece, fn, *args):
        """fn(*args), or None with the piece's error set."""
        try:
            return fn(*args)
        except Exception as exc:
            piece.error = exc
            return None

    def _cut(self, piece: Piece) -> bool:
        """Take the piece's samples into its session's state, and cut the fbank frames they complete."""
        state = piece.state
        if not state:
            state.update(tail=torch.zeros(0), context=None, wave=torch.zeros(0), wave_start=0, emitted=0)
        audio = torch.cat((state["tail"], piece.samples))
        count = (len(audio) - self.frame) // self.shift + 1 if len(audio) >= self.frame else 0
        state["wave"] = torch.cat((state["wave"], piece.samples))
        state["tail"] = audio[count * self.shift :]
        if count:  # funasr's fbank takes int16-scaled samples
            whole = audio[: (count - 1) * self.shift + self.frame] * (1 << 15)
            piece._frames = whole.unfold(0, self.frame, self.shift)
        return True

    def _splice(self, piece: Piece) -> torch.Tensor | None:
        """The spliced frames this chunk completes (funasr's apply_lfr), or None: each one is `splice`
        fbank frames side by side, centred on its own; the stream's first frame stands in for the
        frames before it, and at the end the last frame for those after it."""
        state, fbank, final = piece.state, piece._frames, piece.final
        piece._frames = None
        context = state["context"]
        if fbank is not None and context is None:
            context = fbank[:1].expand(self.left, -1)
        if context is None:  # no frame yet
            return None
        frames = context if fbank is None else torch.cat((context, fbank))
        if final:
            frames = torch.cat((frames, frames[-1:].expand(self.splice - 1 - self.left, -1)))
        elif fbank is None or len(frames) < self.splice:
            state["context"] = frames
            return None
        count = len(frames) - self.splice + 1
        state["context"] = frames[count:]
        return frames.contiguous().as_strided((count, self.dims), (self.bins, 1))

    def _scored_samples(self, state: dict, count: int) -> torch.Tensor:
        """The samples of the next `count` scored frames, [1, samples]; the audio before the next
        unscored frame is let go."""
        start = state["emitted"] * self.shift - state["wave_start"]
        end = start + (count - 1) * self.shift + self.frame
        if start < 0 or end > len(state["wave"]):
            raise RuntimeError(f"VAD features without their samples: need [{start}, {end}) of {len(state['wave'])}")
        samples = state["wave"][start:end].clone()[None]
        state["emitted"] += count
        drop = min(state["emitted"] * self.shift - state["wave_start"], len(state["wave"]))
        state["wave"] = state["wave"][drop:]
        state["wave_start"] += drop
        return samples

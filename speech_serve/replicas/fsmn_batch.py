"""One streaming fsmn-vad step for many sessions at once.

`AutoModel.generate` runs one session's chunk at a time, and at 200 ms chunks most of its cost is
fixed per call: the wrapper (config deep-copies), the frontend's bookkeeping, and a 4-layer FSMN
forward on ~20 frames whose torch op overhead does not depend on the frame count. This module runs
the same streaming path as funasr 1.4.16's `FsmnVADStreaming.inference` (pinned in pyproject.toml)
without the wrapper: the features of every session in one pass (speech_serve/replicas/vad_frontend.py; funasr's
own frontend for a model configured otherwise), and the FSMN encoder of every session with the same
frame count in one batched forward. The endpoint state machine stays per session, in funasr's code,
but for the frame classifier (`GetFrameState`): it reads a list of floats here, not a tensor per frame.

Each session's state is funasr's own `cache` dict, as `generate` keeps it, but for
`cache["frontend"]`, which holds our frontend's state when it runs (vad_frontend.py);
tests/unit/replicas/test_fsmn_batch.py checks that interleaved sessions get the same events
as through `generate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from funasr.models.fsmn_vad_streaming.model import E2EVadFrameProb, FrameState
from funasr.utils.load_utils import extract_fbank

from speech_serve.replicas.vad_frontend import OnlineFeatures, Piece, supports


@dataclass
class Step:
    """One session's chunk (float32 PCM) for a batched step; `segments` is filled in."""

    cache: dict
    pcm: np.ndarray
    final: bool
    chunk_ms: int
    end_silence_ms: int | None = None  # this session's end-of-utterance silence; None: the model's
    segments: list[list[int]] = field(default_factory=list)
    error: Exception | None = None
    # between the phases of run()
    _audio: torch.Tensor | None = None
    _stride: int = 0
    _feats: torch.Tensor | None = None
    _waveform: torch.Tensor | None = None
    _is_final: bool = False


class BatchedFsmnVad:
    def __init__(self, automodel: Any):
        self.model = automodel.model
        self.frontend = automodel.kwargs["frontend"]
        self.features = OnlineFeatures(self.frontend) if supports(self.frontend) else None
        # what funasr's init_cache reads from the model's configuration (generate passes it all)
        wanted = ("max_end_silence_time", "speech_noise_thres")
        self.kwargs = {k: automodel.kwargs[k] for k in wanted if k in automodel.kwargs}
        if self.kwargs.get("max_end_silence_time") is None:
            # generate() would then use funasr's dynamic end-silence schedule, not mirrored here
            raise ValueError("BatchedFsmnVad needs a fixed max_end_silence_time")
        self.layers = len(self.model.encoder.fsmn)
        self._speech_to_sil_ms = self.model.vad_opts.speech_to_sil_time_thres
        opts = self.model.vad_opts
        if len(opts.sil_pdf_ids) != opts.silence_pdf_num:
            raise ValueError("fsmn-vad's sil_pdf_ids and silence_pdf_num disagree")
        # this instance only: scores may come precomputed, and each frame's silence score is kept
        # as a float next to funasr's score tensor (which a drop trims: so is the list)
        self.model.ComputeScores = self._compute_scores
        self.model.GetFrameState = self._frame_state
        self._drop_frames = self.model.DropCachedFrames
        self.model.DropCachedFrames = self._drop_cached_frames

    @torch.no_grad()
    def run(self, steps: list[Step]) -> None:
        """Advance each step's session by its chunk (at most one step per session). A step that
        fails gets `error` (its session's state is then unusable) and leaves the others alone."""
        together = []
        for step in steps:
            try:
                n = self._iterations(step)
                if n == 1:
                    together.append(step)
                else:  # a final chunk flushes the frontend in a second pass: one by one, as funasr does
                    self._run_alone(step, n)
            except Exception as exc:
                step.error = exc
        self._frontend(together)
        together = [step for step in together if step.error is None]
        self._batched_scores(together)
        for step in together:
            try:
                self._finish(step)
                self._close(step)
            except Exception as exc:
                step.error = exc

    # ---- funasr's inference loop (streaming input, fixed end silence), split around the encoder ----

    def _iterations(self, step: Step) -> int:
        if not step.cache:
            self.model.init_cache(step.cache, **self.kwargs)
        self._end_silence(step)
        step._audio = torch.cat((step.cache["prev_samples"], torch.from_numpy(step.pcm)))
        step._stride = int(step.chunk_ms * self.frontend.fs / 1000)
        return int(len(step._audio) // step._stride + int(step.final))

    def _end_silence(self, step: Step) -> None:
        """The session's end silence, set in its own state at every step. funasr keeps the threshold
        per session (`stats.max_end_sil_frame_cnt_thresh`, set by init_cache from the model's option,
        and rewritten by its own dynamic schedule), so sessions of one replica may differ."""
        silence_ms = step.end_silence_ms if step.end_silence_ms is not None else self.kwargs["max_end_silence_time"]
        step.cache["stats"].max_end_sil_frame_cnt_thresh = max(silence_ms - self._speech_to_sil_ms, 0)

    def _frontend(self, steps: list[Step], i: int = 0, final: bool | None = None) -> None:
        """Each step's features for its `i`th piece of audio (all of them together when ours);
        a step that fails gets `error`."""
        pieces = [step._audio[i * step._stride : (i + 1) * step._stride] for step in steps]
        finals = [step.final if final is None else final for step in steps]
        if self.features is not None:
            batch = [Piece(s.cache["frontend"], p, f) for s, p, f in zip(steps, pieces, finals, strict=True)]
            try:
                self.features.features(batch)
            except Exception as exc:  # the shared fbank itself: no session's state can be trusted
                for piece in batch:
                    piece.error = exc
            for step, piece in zip(steps, batch, strict=True):
                step._feats, step._waveform, step._is_final = piece.feats, piece.waveform, piece.final
                step.error = piece.error
            return
        for step, piece, is_final in zip(steps, pieces, finals, strict=True):
            try:
                step._feats, step._waveform = self._funasr_frontend(step, piece, is_final)
                step._is_final = is_final
            except Exception as exc:
                step.error = exc

    def _funasr_frontend(self, step: Step, piece: torch.Tensor, is_final: bool) -> tuple[torch.Tensor, torch.Tensor]:
        extra = {"return_waveform": True} if getattr(self.frontend, "supports_aligned_waveforms", False) else {}
        feats, _ = extract_fbank(
            [piece], data_type="sound", frontend=self.frontend, cache=step.cache["frontend"], is_final=is_final, **extra
        )
        waveform = step.cache["frontend"].get("aligned_waveforms")
        if waveform is None or waveform.numel() == 0:
            waveform = step.cache["frontend"].get("waveforms")
        if feats.numel() > 0 and (waveform is None or waveform.numel() == 0):
            raise RuntimeError("fsmn-vad frontend gave features without their waveform")
        return feats, waveform

    def _finish(self, step: Step) -> None:
        segments = self.model.forward(
            feats=step._feats, waveform=step._waveform, cache=step.cache, is_final=step._is_final,
            is_streaming_input=True,
        )  # fmt: skip
        if segments:
            step.segments.extend(*segments)
        step._feats = step._waveform = None

    def _close(self, step: Step) -> None:
        leftover = int(len(step._audio) % step._stride * (1 - int(step.final)))
        step.cache["prev_samples"] = step._audio[-leftover:] if leftover > 0 else torch.empty(0)
        if step.final:
            self.model.init_cache(step.cache)

    def _run_alone(self, step: Step, n: int) -> None:
        for i in range(n):
            self._frontend([step], i, step.final and i == n - 1)
            if step.error is not None:
                raise step.error
            self._finish(step)
        self._close(step)

    # ---- the batched encoder ---------------------------------------------------------------------

    def _batched_scores(self, steps: list[Step]) -> None:
        groups: dict[int, list[Step]] = {}
        for step in steps:
            if step._feats.numel() == 0:
                continue
            if len(step.cache["encoder"]) == self.layers:
                groups.setdefault(step._feats.shape[1], []).append(step)
            # a session's first frames create its encoder cache: they go through forward() alone
        for group in groups.values():
            if len(group) < 2:
                continue
            try:
                self._encode_together(group)
            except Exception:  # fall back: each session's forward() runs its own encoder
                for step in group:
                    step.cache.pop("_scores", None)

    def _encode_together(self, group: list[Step]) -> None:
        caches = [step.cache["encoder"] for step in group]
        merged = {key: torch.cat([c[key] for c in caches]) for key in caches[0]}
        scores = self.model.encoder(torch.cat([step._feats for step in group]), cache=merged)
        for j, (step, cache) in enumerate(zip(group, caches, strict=True)):
            for key, value in merged.items():
                cache[key] = value[j : j + 1].clone()
            step.cache["_scores"] = scores[j : j + 1]

    def _compute_scores(self, feats: torch.Tensor, cache: dict) -> None:
        """funasr's ComputeScores, taking this chunk's scores from the batched forward when there."""
        scores = cache.pop("_scores", None)
        if scores is None:
            scores = self.model.encoder(feats, cache=cache["encoder"])
        assert scores.shape[1] == feats.shape[1], "fsmn scores and features disagree in length"
        self.model.vad_opts.nn_eval_block_size = scores.shape[1]
        stats = cache["stats"]
        stats.frm_cnt += scores.shape[1]
        # funasr sums the silence ids' scores as Python floats: sum() of the same floats is the same
        silence = [sum(row) for row in scores[0][:, stats.sil_pdf_ids].tolist()] if stats.sil_pdf_ids else []
        if stats.scores is None:
            stats.scores, stats.silence_scores = scores, silence
        else:
            stats.scores = torch.cat((stats.scores, scores), dim=1)
            stats.silence_scores += silence

    def _drop_cached_frames(self, drop_frames: int, cache: dict) -> None:
        """funasr's DropCachedFrames, keeping the silence scores in step with the score tensor."""
        self._drop_frames(drop_frames, cache=cache)
        stats = cache["stats"]
        if stats.scores is not None:
            kept = stats.scores.shape[1]
            stats.silence_scores = stats.silence_scores[len(stats.silence_scores) - kept :]

    def _frame_state(self, t: int, cache: dict) -> FrameState:
        """funasr's GetFrameState (the same decisions, the same noise level update), reading frame
        t's silence score from the list instead of the tensor."""
        stats, opts = cache["stats"], self.model.vad_opts
        if t >= len(stats.decibel):
            return FrameState.kFrameStateSil
        decibel = stats.decibel[t]
        if decibel < opts.decibel_thres:
            return FrameState.kFrameStateSil
        score, noise_prob = 0.0, 0.0
        if stats.sil_pdf_ids:
            score = stats.silence_scores[t]
            noise_prob = math.log(score) * opts.speech_2_noise_ratio
            score = 1.0 - score
        speech_prob = math.log(score)
        if opts.output_frame_probs:
            prob = E2EVadFrameProb()
            prob.noise_prob, prob.speech_prob, prob.score, prob.frame_id = noise_prob, speech_prob, score, t
            stats.frame_probs.append(prob)
        if math.exp(speech_prob) >= math.exp(noise_prob) + stats.speech_noise_thres:
            snr = decibel - stats.noise_average_decibel
            if snr >= opts.snr_thres and decibel >= opts.decibel_thres:
                return FrameState.kFrameStateSpeech
            return FrameState.kFrameStateSil
        if stats.noise_average_decibel < -99.9:
            stats.noise_average_decibel = decibel
        else:
            frames = opts.noise_frame_num_used_for_snr
            stats.noise_average_decibel = (decibel + stats.noise_average_decibel * (frames - 1)) / frames
        return FrameState.kFrameStateSil

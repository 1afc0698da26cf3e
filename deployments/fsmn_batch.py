"""One streaming fsmn-vad step for many sessions at once.

`AutoModel.generate` runs one session's chunk at a time, and at 200 ms chunks most of its cost is
fixed per call: the wrapper (config deep-copies), and a 4-layer FSMN forward on ~20 frames whose
torch op overhead does not depend on the frame count. This module runs the same streaming path as
funasr 1.4.16's `FsmnVADStreaming.inference` (pinned in pyproject.toml) without the wrapper, and
puts the FSMN encoder of every session with the same frame count into one batched forward. The
frontend (fbank) and the endpoint state machine stay per session, in funasr's own code.

Each session's state is funasr's own `cache` dict, exactly as `generate` keeps it;
tests/unit/deployments/test_fsmn_batch.py checks that interleaved sessions get the same events
as through `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from funasr.utils.load_utils import extract_fbank


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
        # what funasr's init_cache reads from the model's configuration (generate passes it all)
        wanted = ("max_end_silence_time", "speech_noise_thres")
        self.kwargs = {k: automodel.kwargs[k] for k in wanted if k in automodel.kwargs}
        if self.kwargs.get("max_end_silence_time") is None:
            # generate() would then use funasr's dynamic end-silence schedule, not mirrored here
            raise ValueError("BatchedFsmnVad needs a fixed max_end_silence_time")
        self.layers = len(self.model.encoder.fsmn)
        self._speech_to_sil_ms = self.model.vad_opts.speech_to_sil_time_thres
        self.model.ComputeScores = self._compute_scores  # this instance only: scores may come precomputed

    @torch.no_grad()
    def run(self, steps: list[Step]) -> None:
        """Advance each step's session by its chunk (at most one step per session). A step that
        fails gets `error` (its session's state is then unusable) and leaves the others alone."""
        together = []
        for step in steps:
            try:
                n = self._iterations(step)
                if n == 1:
                    self._frontend(step)
                    together.append(step)
                else:  # a final chunk flushes the frontend in a second pass: one by one, as funasr does
                    self._run_alone(step, n)
            except Exception as exc:
                step.error = exc
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

    def _frontend(self, step: Step, i: int = 0, final: bool | None = None) -> None:
        piece = step._audio[i * step._stride : (i + 1) * step._stride]
        is_final = step.final if final is None else final
        extra = {"return_waveform": True} if getattr(self.frontend, "supports_aligned_waveforms", False) else {}
        feats, _ = extract_fbank(
            [piece], data_type="sound", frontend=self.frontend, cache=step.cache["frontend"], is_final=is_final, **extra
        )
        waveform = step.cache["frontend"].get("aligned_waveforms")
        if waveform is None or waveform.numel() == 0:
            waveform = step.cache["frontend"].get("waveforms")
        if feats.numel() > 0 and (waveform is None or waveform.numel() == 0):
            raise RuntimeError("fsmn-vad frontend gave features without their waveform")
        step._feats, step._waveform, step._is_final = feats, waveform, is_final

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
            self._frontend(step, i, step.final and i == n - 1)
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
        stats.scores = scores if stats.scores is None else torch.cat((stats.scores, scores), dim=1)

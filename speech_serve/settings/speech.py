"""The speech models as the replicas run them: VADHost (fsmn-vad), SenseVoice, Speaker."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from speech_serve.settings.base import Section


class VadSettings(Section):
    max_end_silence_ms: int = 600
    """Silence that ends an utterance. Shorter answers sooner but splits on pauses."""
    reset_after_ms: int = 20_000
    """Reset a session's fsmn cache between utterances once it holds this much audio, so memory stays flat on
    long sessions."""
    threads: int = 1
    """torch threads per VADHost replica."""
    session_idle_s: float = Field(300.0, gt=0)
    """Forget a session's VAD state once nobody has fed it for this long: an Ingress that crashed never closes
    its sessions, which would count in live_sessions (routing, autoscaling) for ever. A live session that comes
    back later replays its audio, as after a replica change."""
    sessions_per_replica: int = Field(50, ge=1)
    """Sessions one VADHost replica is sized for. Each Ingress replica groups its sessions in lanes of this many
    (one sticky VADHost call stream each), and the VADHost autoscaling policy asks for one replica per this many
    live sessions, so new lanes land on new replicas."""


class AsrSettings(Section):
    language: str = "auto"
    """auto, zh, en, yue, ja, ko"""
    use_itn: bool = True
    """Inverse text normalisation (punctuation, numbers)."""
    threads: int | None = Field(None, ge=1)
    """torch threads per SenseVoice replica. null: the builder's plan (1 on CPU, one replica per core the rest
    leaves; 2 on GPU for the frontend: speech_serve/sizing.py)."""
    quantize: Literal["auto", "none", "int8"] = "auto"
    """auto: int8 on CPU, fp32 on GPU. int8: dynamic int8 quantization of SenseVoice's Linear layers (about half
    the CPU per utterance; FunASR's CPU runtime and sherpa-onnx ship SenseVoice as int8 too; CPU only, ignored on
    GPU). none: fp32 everywhere (transcripts of real weights can differ slightly between the two)."""
    quantized_engine: Literal["onednn", "x86", "fbgemm"] = "onednn"
    """torch's int8 kernels when quantize is int8 (torch.backends.quantized.engine). onednn transcribed 13% more
    speech per CPU-second than torch's default x86 at batch 2 and 30% more at batch 4, the same at batch 1
    (docs/benchmarks.md); x86 is torch's default."""
    trace_encoder: bool = True
    """Run SenseVoice's encoder as a TorchScript trace of itself on CPU: the same transcripts without Python's
    per-layer overhead: 1.35-1.8x the speech per CPU-second at batches 1-4, the same at 8 (docs/benchmarks.md).
    Checked against the eager encoder at load; CUDA keeps eager."""
    dither: float = 0.0
    """Random noise the fbank frontend adds to the audio (FunASR's default is 1.0). 0: the same audio always
    gives the same transcript."""
    beam_size: int = Field(4, ge=1, le=64)
    """Prefixes the CTC beam search keeps per frame for an utterance with hotwords (without any, the greedy
    decode runs, as funasr's). Wider finds hotwords further below the greedy path, at more CPU per utterance."""


class SpeakerSettings(Section):
    enabled: bool = True
    """Run the speaker model on every utterance (who spoke). false: results carry speaker `unknown` and no
    Speaker call is made; enrolment answers 503."""
    threads: int | None = Field(None, ge=1)
    """torch threads per Speaker replica. null: the builder's plan (1 on CPU, 2 on GPU)."""
    keep_embeddings: int = 20
    """Embeddings kept per session (addressable by embedding_id) for later enrolment."""
    min_utterance_ms: int = Field(150, ge=0)
    """Shorter utterances are not sent to the Speaker: their text goes out with speaker unknown (reason
    too_short). ERes2NetV2's statistics pooling gives NaN at 100 ms and raises under 25 ms (measured)."""
    budget_ms: int = Field(300, ge=0)
    """Once an utterance's text is in, how long it waits for its speaker; then it goes out with speaker unknown
    (reason speaker_late). A Speaker outage never holds transcripts (its calls retry for retry.deadline_s).
    ERes2NetV2 on CPU (about 0.6-1.2 s a clip) wants more than CAM++."""
    breaker_failures: int = Field(3, ge=1)
    """Speaker calls in a row that fail or come late before the Speaker is not asked for breaker_open_s (reason
    speaker_unavailable): no call queues for a Speaker that is down. Counted per Ingress replica."""
    breaker_open_s: float = Field(10.0, ge=0)
    """How long the Speaker is not asked after breaker_failures; then the next utterance tries it again."""


class BatchSettings(Section):
    """A model replica's batching; live-tunable through the deployment's `user_config`."""

    max_batch_size: int = Field(8, ge=1)
    """Most utterances in one model call."""
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    """From idle, how long the first request waits for others to share its batch."""

"""What crosses processes: the messages between the Ingress and the replicas (all picklable for
Ray), and the refusals both sides give (the session registry refuses too).

Audio is int16 mono at 16 kHz (speech_serve/wire/pcm.py); times are milliseconds from the start of a
session's audio stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Refusal:
    """Why a connection is refused or ended: the error frame's code and message, and the close code."""

    code: str  # error code in the protocol's error frame, and the metrics' `reason` tag
    message: str
    close_code: int


def to_float32(pcm: np.ndarray) -> np.ndarray:
    """What funasr wants: float32 in [-1, 1]. Never hand it raw bytes (it sniffs them as MP3)."""
    return pcm.astype(np.float32) / 32768.0


def usable_embedding(vector: np.ndarray) -> bool:
    """A speaker vector that can be compared: finite and not all zero (statistics pooling over a
    clip of a frame or two gives NaN)."""
    v = np.asarray(vector, dtype=np.float32)
    return v.size > 0 and bool(np.isfinite(v).all()) and bool(v.any())


@dataclass(frozen=True)
class ModelsSummary:
    """What the Ingress tells clients and /healthz about the models the replicas load."""

    label: Literal["real", "test"]  # "test" when any model has random weights
    sources: dict[str, str]  # role -> where it comes from, in words
    warning: str | None = None


@dataclass(frozen=True)
class ModelTiming:
    """A SenseVoice replica's timing of its own shapes at start: one utterance alone, then a full
    batch of them (admission by compute derives its sessions from it: ingress/capacity.py)."""

    replica: str  # Serve's replica id
    device: str  # cpu or cuda
    threads: int  # torch threads
    cpus: float | None  # CPUs Ray reserved for the replica (None: not known)
    utterance_s: float  # length of each timed utterance
    batch: int  # utterances in the full batch (the replica's max_batch_size)
    single_s: float  # one utterance alone, the fastest of the runs
    batch_s: float  # the full batch, the fastest of the runs


@dataclass(frozen=True)
class VadEvent:
    kind: Literal["start", "end"]
    ms: int  # offset in the session's audio stream


@dataclass
class VadFeedResult:
    events: list[VadEvent]
    # The replica has no state for this session (new replica after a re-pin, or a gap):
    # the caller must replay the unfinished audio with `restart=True`.
    state_lost: bool = False
    compute_ms: float = 0.0
    error: str | None = None  # this session's chunk failed on the replica (the rest of its batch did not)


@dataclass(frozen=True)
class RecognitionOptions:
    """What a client asked for its utterances."""

    language: str = "auto"
    use_itn: bool = True
    return_embedding: bool = False
    speaker_group: str | None = None  # whose voiceprints to match; None: the configured default
    hotwords: tuple[tuple[str, float], ...] = ()  # (phrase, bonus per token), the session's and its household's
    words: bool = False  # word times and confidences in every result


@dataclass(frozen=True)
class AsrRequest:
    pcm: np.ndarray  # int16 mono 16 kHz
    language: str = "auto"
    use_itn: bool = True
    hotwords: tuple[tuple[str, float], ...] = ()  # (phrase, bonus per token): decoded by beam search
    words: bool = False  # word times and confidences wanted (no hotwords: greedy, as without)


@dataclass(frozen=True)
class Word:
    text: str
    start_ms: int  # from the start of the utterance's audio (the Ingress moves it to session time)
    end_ms: int
    confidence: float  # exp(mean log-probability of its tokens)

    def shifted(self, ms: int) -> Word:
        return Word(self.text, self.start_ms + ms, self.end_ms + ms, self.confidence)

    def fields(self) -> dict:
        return {"text": self.text, "start_ms": self.start_ms, "end_ms": self.end_ms,
                "confidence": round(self.confidence, 3)}  # fmt: skip


@dataclass
class Transcript:
    text: str
    language: str | None
    emotion: str | None
    event: str | None
    raw_text: str
    model_ms: float = 0.0
    batch_size: int = 1
    words: tuple[Word, ...] | None = None  # when asked for (AsrRequest.words or hotwords)
    confidence: float | None = None  # of the whole text, with the words


@dataclass(frozen=True)
class SpeakerRequest:
    pcm: np.ndarray  # int16 mono 16 kHz
    group: str | None = None  # match against this group's voiceprints; None: embedding only


@dataclass
class SpeakerEmbedding:
    vector: np.ndarray  # float32, (dim,)
    model: str  # which speaker model made it: embeddings of different models are never compared
    model_ms: float = 0.0
    batch_size: int = 1
    label: str = "unknown"
    score: float | None = None
    speaker_id: str | None = None


@dataclass(frozen=True)
class VadChunk:
    """Audio for one VADHost call."""

    pcm: np.ndarray  # int16
    start_ms: int
    final: bool = False
    restart: bool = False
    # Silence that ends an utterance for this stream; None: the VADHost's vad.max_end_silence_ms.
    # Carried on every chunk (applied at each step), so a change takes effect at once, and a
    # re-pinned session's new replica uses it from its replay on.
    end_silence_ms: int | None = None


@dataclass(frozen=True)
class VadItem:
    """One session's part of a batched VADHost call (`feed_many`): a chunk, or None to free its state."""

    session_id: str
    chunk: VadChunk | None


@dataclass(frozen=True)
class Utterance:
    index: int
    start_ms: int
    end_ms: int
    pcm: np.ndarray  # int16
    forced_cut: bool = False  # cut at max_utterance_ms, not by the VAD


@dataclass
class SpeakerInfo:
    label: str = "unknown"  # an enrolled name, or "unknown"
    score: float | None = None
    speaker_id: str | None = None
    embedding_id: str | None = None
    embedding: list[float] | None = None
    # Why the speaker is unknown without a match having been tried (the text still went out):
    # too_short, no_embedding, speaker_failed, shed (skipped under load). None when the Speaker answered.
    reason: str | None = None

    def fields(self) -> dict:
        """For the wire: the embedding only when the client asked for it, the reason only when set."""
        out = {
            "label": self.label,
            "score": self.score,
            "speaker_id": self.speaker_id,
            "embedding_id": self.embedding_id,
        }
        if self.reason is not None:
            out["reason"] = self.reason
        return out if self.embedding is None else {**out, "embedding": self.embedding}


@dataclass
class UtteranceResult:
    session_id: str
    index: int
    start_ms: int
    end_ms: int
    text: str
    language: str | None
    emotion: str | None
    event: str | None
    raw_text: str
    speaker: SpeakerInfo
    models: Literal["real", "test"]
    forced_cut: bool = False
    words: tuple[Word, ...] | None = None  # in session time, when the session asked for them
    confidence: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)  # per stage, calls repeated after a lost replica

    def word_fields(self) -> dict:
        """`words` and `confidence` for the wire when they were decoded (asked for, or hotwords), else none."""
        if self.words is None:
            return {}
        confidence = None if self.confidence is None else round(self.confidence, 3)
        return {"words": [w.fields() for w in self.words], "confidence": confidence}

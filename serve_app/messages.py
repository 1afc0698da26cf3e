"""Typed messages that cross module and process boundaries (all picklable for Ray)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


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


@dataclass(frozen=True)
class AsrRequest:
    pcm: np.ndarray  # int16 mono 16 kHz
    language: str = "auto"
    use_itn: bool = True


@dataclass
class Transcript:
    text: str
    language: str | None
    emotion: str | None
    event: str | None
    raw_text: str
    model_ms: float = 0.0
    batch_size: int = 1


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

    def fields(self) -> dict:
        """For the wire: the embedding only when the client asked for it."""
        out = {
            "label": self.label,
            "score": self.score,
            "speaker_id": self.speaker_id,
            "embedding_id": self.embedding_id,
        }
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
    latency_ms: dict[str, float] = field(default_factory=dict)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)  # per stage, calls repeated after a lost replica

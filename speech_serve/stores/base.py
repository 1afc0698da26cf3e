"""What every store is and returns: the records, the interface, the one error a caller handles."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Voiceprint:
    id: str
    name: str
    group: str
    model: str
    dim: int
    embeddings: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Candidate:
    speaker_id: str
    name: str
    centroid: np.ndarray  # unit length


class StoreUnavailable(RuntimeError):
    """The store cannot be reached or opened; the message says which store and why (never a password)."""


class VoiceprintStore(Protocol):
    """Voiceprints and each household's hotword list. Every change moves `revision()`, which
    Speaker replicas and Ingress refreshers poll to know when to read again."""

    def create(self, name: str, group: str, model: str, vectors: Sequence[np.ndarray]) -> Voiceprint: ...
    def get(self, speaker_id: str) -> Voiceprint | None: ...
    def list(self, group: str | None = None) -> list[Voiceprint]: ...
    def rename(self, speaker_id: str, name: str) -> Voiceprint | None: ...
    def replace_embeddings(self, speaker_id: str, model: str, vectors: Sequence[np.ndarray]) -> Voiceprint | None: ...
    def delete(self, speaker_id: str) -> bool: ...
    def candidates(self, group: str, model: str) -> list[Candidate]: ...
    def hotwords(self, group: str) -> dict[str, float]: ...
    def set_hotwords(self, group: str, hotwords: Mapping[str, float]) -> None: ...
    def revision(self) -> int: ...


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("embedding is zero or not finite")
    return v / norm


def checked_hotwords(hotwords: Mapping[str, float]) -> dict[str, float]:
    """phrase -> weight, or a ValueError naming the bad entry: a phrase is text with something in it,
    a weight a finite number (a NaN would poison every decode of the household)."""
    out = {}
    for phrase, weight in hotwords.items():
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"hotword {phrase!r}: a phrase must be non-empty text")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise ValueError(f"hotword {phrase!r}: weight {weight!r} is not a finite number")
        out[phrase] = float(weight)
    return out

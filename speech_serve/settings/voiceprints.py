"""Enrolled voiceprints: where they are stored and how close a voice must come to one."""

from __future__ import annotations

from pydantic import Field, field_validator

from speech_serve.settings.base import Section

MATCH_THRESHOLDS = {"ge2e": 0.82, "eres2netv2": 0.6, "campplus": 0.6}  # cosine; measured per model


class VoiceprintSettings(Section):
    store: str = "sqlite:///~/.cache/speech-serve/voiceprints.sqlite3"
    """Where voiceprints and household hotword lists live. `sqlite:///path` or a plain path: one private file on
    this host. `postgresql://user:password@host:5432/db` (or `postgres://`): a PostgreSQL server every Ingress and
    Speaker host shares (needed for enrolment on several pods). `env:NAME`: the URL is read from the environment
    variable NAME when the store opens, so a password stays out of YAML (a missing variable stops the replica,
    naming it). The schema is migrated when the store opens."""
    thresholds: dict[str, float] = Field(default_factory=lambda: dict(MATCH_THRESHOLDS))
    """Cosine to an enrolled centroid needed to name the speaker, per speaker model. A model left out keeps its
    default; a model with no default must be given one."""
    default_group: str = "default"
    """Group for sessions that name none."""
    refresh_s: float = 1.0
    """How often a Speaker replica checks the store for new enrolments."""
    cached_groups: int = Field(1024, ge=1)
    """Groups whose voiceprints a Speaker replica keeps in memory (the least recently matched go first): every
    unmapped device is a group of its own."""
    min_enroll_s: float = 1.0
    """Shortest enrolment clip accepted."""
    max_enroll_s: float = 30.0
    """Longest enrolment clip accepted."""
    max_enroll_files: int = 10
    """Most clips in one enrolment request."""
    enrolment: bool = True
    """Whether the admin API takes enrolments (new voiceprints, re-enrolments). Off where the store is not shared
    by every Ingress and Speaker host (SQLite on several pods): enrolments then answer 501 instead of a 201 that no
    other host would ever see."""

    @field_validator("thresholds")
    @classmethod
    def _keep_defaults(cls, given: dict[str, float]) -> dict[str, float]:
        """Overriding one model's threshold keeps the others' (a partial YAML map must not
        leave the running model with none)."""
        for arch, value in given.items():
            if not 0.0 < value < 1.0:
                raise ValueError(f"thresholds.{arch} must be a cosine between 0 and 1, got {value}")
        return {**MATCH_THRESHOLDS, **given}

    def threshold(self, arch: str) -> float:
        """The match threshold of a speaker model; a clear error if it has none."""
        if arch not in self.thresholds:
            raise ValueError(f"no speaker match threshold for model {arch!r}: set voiceprints.thresholds.{arch} "
                             f"(known: {', '.join(sorted(self.thresholds))})")  # fmt: skip
        return self.thresholds[arch]

"""Typed settings for the whole application: one section per concept, each field's default, bounds
and description (the docstring under it) stated once, here (docs/configuration.md is generated from
them: `make docs`).

`config/serve.yaml` passes `args` to the app builder; they are parsed into `AppSettings`. Every
default is a working value for a 2-core laptop; the YAML overrides what an operator wants to
change. Units are in the field names (`_ms`, `_s`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from speech_serve.settings.admission import AdmissionSettings, ComputeSettings, RetrySettings
from speech_serve.settings.base import Section
from speech_serve.settings.deployments import (
    DEFAULT_DEPLOYMENT_OPTIONS,
    Placement,
    PlacementName,
    SizingSettings,
    default_placement,
)
from speech_serve.settings.ingress import DrainSettings, HealthSettings, LimitSettings, StreamSettings, UploadSettings
from speech_serve.settings.logs import LogSettings
from speech_serve.settings.models import ModelSettings, ModelSpec
from speech_serve.settings.protocols import FunasrSettings, RealtimeSettings, XiaozhiSettings
from speech_serve.settings.security import MIN_REDACTED_CHARS, SecuritySettings
from speech_serve.settings.speech import AsrSettings, BatchSettings, SpeakerSettings, VadSettings
from speech_serve.settings.voiceprints import MATCH_THRESHOLDS, VoiceprintSettings

__all__ = [
    "DEFAULT_DEPLOYMENT_OPTIONS", "MATCH_THRESHOLDS", "MIN_REDACTED_CHARS", "AdmissionSettings", "AppSettings",
    "AsrSettings", "BatchSettings", "ComputeSettings", "DrainSettings", "FunasrSettings", "HealthSettings",
    "LimitSettings", "LogSettings", "ModelSettings", "ModelSpec", "Placement", "PlacementName", "RealtimeSettings",
    "RetrySettings",
    "SecuritySettings", "SizingSettings", "SpeakerSettings", "StreamSettings", "UploadSettings", "VadSettings",
    "VoiceprintSettings", "XiaozhiSettings",
]  # fmt: skip

# The old `ingress:` section, split by concept: where each key went.
MOVED_INGRESS_KEYS = {
    **{k: f"stream.{k}" for k in ("vad_chunk_ms", "vad_batch_interval_ms", "vad_max_lag_ms", "max_utterance_ms",
                                  "min_utterance_ms", "max_utterances_in_flight")},
    **{k: f"limits.{k}" for k in ("max_frame_bytes", "max_text_frame_bytes", "max_field_chars", "control_burst",
                                  "control_per_s", "max_protocol_errors", "max_audio_rate", "max_frames_per_s",
                                  "rate_window_s", "max_queued_bytes", "idle_timeout_s")},
    "vad_sessions_per_lane": "vad.sessions_per_replica", "speaker_enabled": "speaker.enabled",
    "max_upload_bytes": "uploads.max_bytes", "max_upload_s": "uploads.max_seconds",
    "max_upload_sample_rate": "uploads.max_sample_rate", "max_concurrent_uploads": "uploads.max_concurrent",
    "upload_body_timeout_s": "uploads.body_timeout_s", "upload_retry_after_s": "uploads.retry_after_s",
    "max_upload_segments_in_flight": "uploads.max_segments_in_flight",
    "drain_poll_s": "drain.poll_s", "drain_margin_s": "drain.margin_s", "drain_idle_wait_s": "drain.idle_wait_s",
    "healthz_cache_s": "health.cache_s", "healthz_timeout_s": "health.timeout_s",
}  # fmt: skip


class AppSettings(Section):
    # Errors name the setting and what is wrong, never the value: it may be a pasted secret.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, use_attribute_docstrings=True)

    models: ModelSettings = ModelSettings()
    """Where the models come from."""
    vad: VadSettings = VadSettings()
    """fsmn-vad on the VADHost replicas."""
    asr: AsrSettings = AsrSettings()
    """SenseVoice on its replicas."""
    speaker: SpeakerSettings = SpeakerSettings()
    """The speaker model on its replicas."""
    voiceprints: VoiceprintSettings = VoiceprintSettings()
    """Enrolled voiceprints."""
    stream: StreamSettings = StreamSettings()
    """Each session's utterance stream."""
    limits: LimitSettings = LimitSettings()
    """What one WebSocket client may send."""
    uploads: UploadSettings = UploadSettings()
    """Uploaded files and enrolments."""
    drain: DrainSettings = DrainSettings()
    """A stopping Ingress replica's sessions."""
    health: HealthSettings = HealthSettings()
    """The /healthz probe."""
    admission: AdmissionSettings = AdmissionSettings()
    """Who may open a session."""
    compute: ComputeSettings = ComputeSettings()
    """How many sessions the model replicas serve in time (admission by compute)."""
    xiaozhi: XiaozhiSettings = XiaozhiSettings()
    """Xiaozhi devices (/xiaozhi/v1/)."""
    funasr: FunasrSettings = FunasrSettings()
    """FunASR clients (/ and /funasr)."""
    realtime: RealtimeSettings = RealtimeSettings()
    """OpenAI Realtime clients (/v1/realtime)."""
    security: SecuritySettings = SecuritySettings()
    """Device and admin authentication."""
    retry: RetrySettings = RetrySettings()
    """Calls to a lost replica."""
    logging: LogSettings = LogSettings()
    """How every deployment writes its logs."""
    sizing: SizingSettings = SizingSettings()
    """How the builder sizes the model replicas for the host."""
    placement: dict[PlacementName, Placement] = Field(default_factory=default_placement)
    """ray_actor_options per deployment (CPUs, GPU fractions)."""
    use_gpus: Literal["auto", "always", "never"] = "auto"
    """auto: the placement's num_gpus apply where the cluster has GPUs when the app is built. always: they apply
    even if no GPU node is up yet (a cluster autoscaler adds GPU nodes on demand, e.g. KubeRay; the replicas wait
    for them). never: models on CPU even where there are GPUs."""

    @field_validator("placement", mode="before")
    @classmethod
    def _over_the_defaults(cls, given: Any) -> Any:
        """A deployment's placement given in part keeps the rest of its default, and the deployments
        not given keep theirs (`placement: {VADHost: {resources: ...}}` changes only that)."""
        if not isinstance(given, dict):
            return given
        merged: dict[str, Any] = {name: p.model_dump() for name, p in default_placement().items()}
        for name, value in given.items():
            merged[name] = {**merged.get(name, {}), **value} if isinstance(value, dict) else value
        return merged

    @model_validator(mode="before")
    @classmethod
    def _ingress_was_split(cls, data: Any) -> Any:
        """The old `ingress:` section is refused with where each of its keys went."""
        old = data.get("ingress") if isinstance(data, dict) else None
        if old is not None:
            keys = sorted(old) if isinstance(old, dict) else []
            where = ", ".join(f"ingress.{k} -> {MOVED_INGRESS_KEYS.get(k, '?')}" for k in keys)
            raise ValueError(f"the `ingress` section was split by concept ({where or 'see docs/configuration.md'})")
        return data

"""Per-protocol settings: Xiaozhi devices, FunASR clients, OpenAI Realtime clients."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from speech_serve.settings.base import Section


class XiaozhiSettings(Section):
    hello_timeout_s: float = 10.0
    """Close a connection that sends no hello in this time."""
    hello_audio_params: dict = Field(
        default_factory=lambda: {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60}
    )
    """audio_params in our hello: what we send back to devices (we send no audio)."""

    @model_validator(mode="before")
    @classmethod
    def _moved_to_security(cls, data: Any) -> Any:
        """Device authentication covers every protocol now: say where the old keys went."""
        moved = sorted(set(data) & set(_MOVED_XIAOZHI_KEYS)) if isinstance(data, dict) else []
        if moved:
            where = ", ".join(f"xiaozhi.{k} -> security.{_MOVED_XIAOZHI_KEYS[k]}" for k in moved)
            raise ValueError(f"device authentication settings moved to `security` ({where})")
        return data


_MOVED_XIAOZHI_KEYS = {
    "auth_enabled": "device_auth (auto | on | off)",
    "secret_env": "device_secret_env",
    "max_token_age_s": "max_token_age_s",
    "allowed_devices": "allowed_devices",
}


class FunasrSettings(Section):
    interim_interval_ms: int = 600
    """online/2pass: re-decode the growing segment this often for interim text. Interims run at low priority on
    SenseVoice and never delay final results."""
    max_frame_bytes: int = Field(1_048_576, ge=64_000)
    """Largest binary frame a FunASR client may send (limits.max_frame_bytes is the other protocols'); past it:
    `frame_too_large`, close 1009. xiaozhi-esp32-server's FunASR-server ASR provider sends each utterance as one
    frame: 1 MiB holds 32 s of 16 kHz PCM16 (more than stream.max_utterance_ms), as FunASR's own Python server
    takes (websockets' default). A big frame is paced like any audio (limits.max_audio_rate)."""


class RealtimeSettings(Section):
    """The OpenAI Realtime transcription endpoint (`/v1/realtime`): how far its clients may move our VAD."""

    min_silence_duration_ms: int = Field(200, ge=0)
    """Shortest end-of-utterance silence a client may ask for (turn_detection.silence_duration_ms is raised to
    it): shorter splits words at every pause."""
    max_silence_duration_ms: int = Field(3000, ge=0)
    """Longest end-of-utterance silence a client may ask for (lowered to it): a longer one holds the utterance,
    its audio and its result back that long after the speaker stops."""
    max_event_bytes: int = Field(2_097_152, ge=65_536)
    """Largest client event (a text frame): appends carry base64 audio, 2 MiB holds about 21 s of 24 kHz PCM16 per
    event (OpenAI takes up to 15 MiB). Past it: `frame_too_large`, close 1009. Every append, whatever audio it
    holds, is paced as the audio its size could carry (limits.max_audio_rate): padding buys no extra parsing."""
    interim_interval_ms: int | None = Field(600, gt=0)
    """Re-decode the utterance being spoken this often and send the new text as
    conversation.item.input_audio_transcription.delta events (low priority on SenseVoice). null: no deltas."""

    @model_validator(mode="after")
    def _range(self) -> RealtimeSettings:
        if self.min_silence_duration_ms > self.max_silence_duration_ms:
            raise ValueError("realtime.min_silence_duration_ms must not exceed realtime.max_silence_duration_ms")
        return self

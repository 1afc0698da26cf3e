"""What the Ingress replicas do with their sessions: the utterance stream, what one client may send,
uploads, draining and the health probe."""

from __future__ import annotations

from pydantic import Field, model_validator

from speech_serve.settings.base import Section


class StreamSettings(Section):
    """Each session's utterance stream: its VAD chunks, their batched calls, its utterances."""

    vad_chunk_ms: int = 200
    """Audio of one session per VAD chunk (one item of a batched VADHost call). Larger chunks cost less VAD work
    per second of audio but add up to one chunk of end-of-speech latency."""
    vad_batch_interval_ms: int = Field(100, ge=0)
    """Least time between two batched VADHost calls of one lane (the chunks of many sessions go in one call). A
    Serve call costs more CPU than the VAD work of a chunk: under load the calls per second stay flat and batches
    grow; a chunk waits at most this long."""
    vad_max_lag_ms: int = Field(2000, ge=0)
    """How far a session's VAD may lag behind its audio before its frames wait (they queue in its socket, and TCP
    slows the client). Audio that came while a VAD call was out goes in the next call as one chunk, so a session
    catches up at once after a slow call."""
    max_utterance_ms: int = 30_000
    """Force-cut an utterance that runs this long."""
    min_utterance_ms: int = Field(50, ge=1)
    """Drop shorter utterances before they reach the models, and send no result for them: a VAD end at a
    force-cut leaves 0 samples, and SenseVoice's fbank raises below about 20 ms (measured), which failed the
    whole model batch. 50 ms holds no word."""
    max_utterances_in_flight: int = Field(4, ge=1)
    """Utterances of one session being recognised at once. Audio that ends more waits for room (its frames queue,
    bounded by limits.max_queued_bytes): no session fans out without bound. One VAD call that ends several
    utterances (a session catching up) may pass it by those."""


class LimitSettings(Section):
    """What one WebSocket client may send; past a bound the session is closed (or its audio paced)."""

    max_frame_bytes: int = 64_000
    """Largest binary frame a plain or Xiaozhi client may send (2 s of PCM16); FunASR: funasr.max_frame_bytes."""
    max_text_frame_bytes: int = Field(65_536, ge=1024)
    """Largest text frame accepted (JSON control: a Xiaozhi MCP payload is a few kB); past it: `frame_too_large`,
    close 1009. The WebSocket layer alone would take 16 MB."""
    max_field_chars: int = Field(1024, ge=16)
    """Longest string field of a control frame (speaker_group, wav_name, language, hotwords, ...): some are
    echoed in every answer or kept. Past it: `field_too_long`, and the session goes on."""
    control_burst: int = 50
    """Control (text) frames a session may send at once; past it and control_per_s, close 1008."""
    control_per_s: float = 10.0
    """Control frames per second a session may keep up. Each costs the ingress a parse and maybe an answer: an
    unbounded flood would take its event loop from every other session."""
    max_protocol_errors: int = 20
    """Error frames one session may earn (bad JSON, bad Opus packets, ...) before it is closed with 1008: a
    client looping on bad input would otherwise get one answer per frame for ever."""
    max_audio_rate: float | None = Field(1.5, gt=0)
    """Seconds of audio a session's pipeline takes per second, over rate_window_s (1.5: room for catching up
    after a stall). Faster audio is paced, not refused: the session holds it back (up to max_queued_bytes), so a
    file sent at full speed is recognised at this rate. null: no bound."""
    max_frames_per_s: float = Field(200.0, gt=0)
    """Frames (binary and text) a session may send per second, measured over rate_window_s and counted as they
    arrive. 200: 10 ms frames at twice real time. Past it: `too_many_messages`, close 1008."""
    rate_window_s: float = Field(20.0, gt=0)
    """Window of max_audio_rate and max_frames_per_s: a session may be this many seconds' worth ahead at once (a
    short file sent at once, a client catching up after a stall) before the rate applies."""
    max_hotwords: int = Field(100, ge=0)
    """Hotwords one session may send (each a phrase the decoder favours): past it, `bad_hotwords`."""
    max_hotword_chars: int = Field(40, ge=1)
    """Longest hotword phrase."""
    hotword_weight: float = Field(1.5, gt=0)
    """Bonus per token of a hotword sent without a weight, in the decoder's log-probability units (sherpa-onnx's
    default). A bonus near a word's gap to the greedy path makes it win; far above it, it wins where it is not."""
    max_hotword_weight: float = Field(5.0, gt=0)
    """Largest bonus per token a client may give a hotword (larger ones are cut to it)."""
    max_queued_bytes: int = Field(32_000_000, ge=65_536)
    """Bytes of frames a session may have received but not yet handled (audio held back by max_audio_rate, frames
    behind a busy stream); past it: `too_far_ahead`, close 1008. Ray Serve reads every message off the socket as
    it comes, so not reading would not slow the client, only fill the Ingress's memory. 32 MB: 16 minutes of
    16 kHz PCM sent at once."""
    idle_timeout_s: float = 300.0
    """Close a session that sends nothing for this long (error `idle_timeout`, close 1000)."""


class UploadSettings(Section):
    """Whole files: /v1/audio/transcriptions and voiceprint enrolments."""

    max_bytes: int = 50_000_000
    """Largest uploaded file. Uploads are held in memory up to this size and refused above it (413); never
    spooled to disk."""
    max_seconds: float = 1800.0
    """Longest audio in one /v1/audio/transcriptions file (413 past it): compressed silence packs hours into a
    few kB, so bytes alone do not bound the memory a file takes."""
    max_sample_rate: int = Field(48_000, ge=8_000)
    """Highest sample rate of an uploaded file (HTTP 400 above it, from the header, before decoding): a FLAC
    header may claim 655350 Hz, and decoding costs the file's own rate."""
    max_concurrent: int = Field(2, ge=1)
    """File transcriptions one Ingress replica decodes and recognises at once (each may hold max_bytes and
    max_seconds of audio); more get 503 with Retry-After. Only a whole body takes one."""
    max_concurrent_enrolments: int = Field(1, ge=1)
    """Voiceprint enrolments (admin) one Ingress replica decodes and embeds at once; a gate apart from the
    devices' transcriptions, so devices never hold the admin's uploads back."""
    max_receiving: int = Field(4, ge=1)
    """Upload bodies of one kind (transcriptions; enrolments) one Ingress replica receives at once, each held in
    memory up to max_bytes; more get 503 with Retry-After."""
    body_timeout_s: float = Field(120.0, gt=0)
    """Longest time to receive an upload's whole body: past it, HTTP 408."""
    min_body_bytes_per_s: float | None = Field(8000.0, gt=0)
    """Past its first body_grace_s, an upload's body must arrive at this average rate (64 kbit/s) or get HTTP
    408 at once: a client trickling its body would hold a receiving slot for body_timeout_s. null: no bound."""
    body_grace_s: float = Field(10.0, ge=0)
    """Time an upload's body may take before min_body_bytes_per_s applies (a connection that starts slowly)."""
    retry_after_s: int = Field(5, ge=1)
    """Retry-After (seconds) of the 503 an upload gets while the replica is at its cap."""
    max_segments_in_flight: int = Field(4, ge=1)
    """Speech segments of one uploaded file being recognised at once: a long file goes to the models a few
    segments at a time, never all at once ahead of the live sessions' utterances."""
    vad_piece_s: float = Field(10.0, gt=0, le=60)
    """Audio of an uploaded file per VADHost call while it is cut into segments (a few ms of the replica's one
    model thread each): the live sessions' VAD steps on that replica take turns with the pieces."""


class DrainSettings(Section):
    """What a stopping Ingress replica does with its sessions (Serve's graceful_shutdown_timeout_s)."""

    poll_s: float = 2.0
    """How often an ingress replica asks Serve whether it is stopping."""
    margin_s: float = 30.0
    """A stopping ingress replica asks its sessions to reconnect (close 1012) this long before Serve's
    graceful_shutdown_timeout_s runs out. Before that, sessions go on untouched."""
    idle_wait_s: float = 10.0
    """Once asked to reconnect, a session waits up to this long for the pause after its next result; after it, an
    open utterance is cut and transcribed, then the session closes."""

    @model_validator(mode="after")
    def _fits(self) -> DrainSettings:
        if self.idle_wait_s >= self.margin_s:
            raise ValueError("drain.idle_wait_s must be shorter than drain.margin_s")
        return self


class HealthSettings(Section):
    """/healthz: unauthenticated, so it must stay cheap for the sessions sharing the replica."""

    cache_s: float = Field(1.0, ge=0)
    """/healthz reuses the Serve controller's answer this long (a flood of probes shares one controller call,
    made off the event loop)."""
    timeout_s: float = Field(5.0, gt=0)
    """/healthz waits this long for the Serve controller, then answers 503 with the reason."""

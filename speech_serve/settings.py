"""Typed settings for the whole application, and the one table of Serve deployment options.

`config/serve.yaml` passes `args` to the app builder; they are parsed into `AppSettings`.
Every default here is a working value for a 2-core laptop; the YAML overrides what an
operator wants to change. Units are in the field names (`_ms`, `_s`).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from speech_serve.wire.tokens import DEFAULT_SECRET_ENV, MIN_SECRET_CHARS

# Serve's options per deployment, stated once: the builder applies them (with `placement` below);
# a deployment's entry under `deployments:` in config/serve.yaml overrides them, as Serve's config
# always does (that file also holds autoscaling_config and user_config).
# Internal calls write no access-log line each (QUIET): a VADHost takes 5 calls per second per
# session, and every line costs CPU in the replica and in `serve run`, which echoes it. The Ingress
# (HTTP and WebSocket requests from clients) keeps its access log.
QUIET = {"logging_config": {"enable_access_log": False}}
DEPLOYMENT_OPTIONS: dict[str, dict[str, Any]] = {
    # Each live WebSocket holds one request: Serve's default cap of 5 would queue the 6th session
    # (and /healthz) in the proxy. A stopping replica's sessions may go on for the grace period.
    "Ingress": {"max_ongoing_requests": 200, "graceful_shutdown_timeout_s": 600},
    # Short calls from many sessions, each pinned to its replica by the sticky router.
    "VADHost": {
        "max_ongoing_requests": 1000,
        "health_check_period_s": 2,
        "request_router_config": {"request_router_class": "speech_serve.replicas.lane_router:LaneRouter"},
        **QUIET,
    },
    # Utterances queue here to be batched. health_check_period_s: a dead replica is noticed (and
    # replaced) within 2 s instead of Serve's 10; its callers wait for the replacement.
    "SenseVoice": {"max_ongoing_requests": 64, "health_check_period_s": 2, **QUIET},
    "Speaker": {"max_ongoing_requests": 64, "health_check_period_s": 2, **QUIET},
    # One replica, no model: its state is a dict, so it must not be scaled out.
    "SessionRegistry": {
        "num_replicas": 1,
        "max_ongoing_requests": 1000,
        "ray_actor_options": {"num_cpus": 0},
        **QUIET,
    },
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """Where one model comes from: an explicit directory first, then the hub id."""

    path: str | None = Field(None, description="Local model directory; wins over the hub.")
    hub_id: str = Field(..., description="ModelScope (or Hugging Face) model id.")


class ModelSettings(_Strict):
    hub: Literal["ms", "hf"] = "ms"
    hub_probe_timeout_s: float = Field(3.0, description="How long to wait for the hub before falling back.")
    allow_test_models: bool = Field(
        True, description="Fall back to locally built random-weight models when the hub is unreachable."
    )
    require_real_models: bool = Field(
        False, description="Refuse to start with random-weight models (overrides allow_test_models)."
    )
    test_model_size: Literal["tiny", "full"] = Field(
        "tiny", description="tiny: fast, for tests. full: the real architecture, for benchmarks."
    )
    cache_dir: str = Field("~/.cache/speech-serve/models", description="Where test models are built.")
    vad: ModelSpec = ModelSpec(hub_id="iic/speech_fsmn_vad_zh-cn-16k-common-pytorch")
    asr: ModelSpec = ModelSpec(hub_id="iic/SenseVoiceSmall")
    speaker: ModelSpec = ModelSpec(hub_id="iic/speech_eres2netv2_sv_zh-cn_16k-common")
    speaker_arch: Literal["eres2netv2", "campplus"] = Field(
        "eres2netv2", description="Architecture of the random-weight speaker model built for tests."
    )
    speaker_backend: Literal["funasr", "ge2e"] = Field(
        "funasr",
        description="funasr: ERes2NetV2/CAM++ (192-d) through AutoModel. ge2e: resemblyzer's GE2E encoder "
        "(256-d, real weights shipped in its wheel: speaker identity works offline).",
    )

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()


class VadSettings(_Strict):
    max_end_silence_ms: int = Field(
        600, description="Silence that ends an utterance. Shorter answers sooner but splits on pauses."
    )
    reset_after_ms: int = Field(
        20_000,
        description="Reset a session's fsmn cache between utterances once it holds this much audio, "
        "so memory stays flat on long sessions.",
    )
    threads: int = Field(1, description="torch threads per VADHost replica.")
    session_idle_s: float = Field(
        300.0,
        gt=0,
        description="Forget a session's VAD state once nobody has fed it for this long: an Ingress that "
        "crashed never closes its sessions, which would count in live_sessions (routing, autoscaling) for "
        "ever. A live session that comes back later replays its audio, as after a replica change.",
    )


class AsrSettings(_Strict):
    language: str = Field("auto", description="auto, zh, en, yue, ja, ko")
    use_itn: bool = Field(True, description="Inverse text normalisation (punctuation, numbers).")
    threads: int = Field(2, description="torch threads per SenseVoice replica on CPU.")
    quantize: Literal["none", "int8"] = Field(
        "none",
        description="int8: dynamic int8 quantization of SenseVoice's Linear layers on CPU (about half the "
        "CPU per utterance; FunASR's runtime ships SenseVoice as int8 too). Ignored on GPU.",
    )
    quantized_engine: Literal["onednn", "x86", "fbgemm"] = Field(
        "onednn",
        description="torch's int8 kernels when quantize is int8 (torch.backends.quantized.engine). onednn "
        "transcribed 13% more speech per CPU-second than torch's default x86 at batch 2 and 30% more at "
        "batch 4, the same at batch 1 (README \"Capacity\"); x86 is torch's default.",
    )
    trace_encoder: bool = Field(
        True,
        description="Run SenseVoice's encoder as a TorchScript trace of itself on CPU: the same transcripts "
        "without Python's per-layer overhead: 1.35-1.8x the speech per CPU-second at batches 1-4, the same at 8 "
        "(docs/capacity.md \"Fifth round\"). Checked against the eager encoder at load; CUDA keeps eager.",
    )
    dither: float = Field(
        0.0,
        description="Random noise the fbank frontend adds to the audio (FunASR's default is 1.0). "
        "0: the same audio always gives the same transcript.",
    )


class SpeakerSettings(_Strict):
    threads: int = Field(2, description="torch threads per Speaker replica on CPU.")
    keep_embeddings: int = Field(
        20, description="Embeddings kept per session (addressable by embedding_id) for later enrolment."
    )
    min_utterance_ms: int = Field(
        150,
        ge=0,
        description="Shorter utterances are not sent to the Speaker: their text goes out with speaker unknown "
        "(reason too_short). ERes2NetV2's statistics pooling gives NaN at 100 ms and raises under 25 ms (measured).",
    )


MATCH_THRESHOLDS = {"ge2e": 0.82, "eres2netv2": 0.6, "campplus": 0.6}  # cosine; measured per model


class VoiceprintSettings(_Strict):
    store: str = Field("sqlite:///~/.cache/speech-serve/voiceprints.sqlite3", description="Store URL or path.")
    thresholds: dict[str, float] = Field(
        default_factory=lambda: dict(MATCH_THRESHOLDS),
        description="Cosine to an enrolled centroid needed to name the speaker, per speaker model. A model "
        "left out keeps its default; a model with no default must be given one.",
    )

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
    default_group: str = Field("default", description="Group for sessions that name none.")
    refresh_s: float = Field(1.0, description="How often a Speaker replica checks the store for new enrolments.")
    min_enroll_s: float = Field(1.0, description="Shortest enrolment clip accepted.")
    max_enroll_s: float = Field(30.0, description="Longest enrolment clip accepted.")
    max_enroll_files: int = Field(10, description="Most clips in one enrolment request.")


class BatchSettings(_Strict):
    """Live-tunable through the deployment's `user_config`."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02


class IngressSettings(_Strict):
    vad_chunk_ms: int = Field(
        200,
        description="Audio of one session per VAD chunk (one item of a batched VADHost call). Larger chunks "
        "cost less VAD work per second of audio but add up to one chunk of end-of-speech latency.",
    )
    vad_batch_interval_ms: int = Field(
        100,
        ge=0,
        description="Least time between two batched VADHost calls of one lane (the chunks of many sessions "
        "go in one call). A Serve call costs more CPU than the VAD work of a chunk: under load the calls "
        "per second stay flat and batches grow; a chunk waits at most this long.",
    )
    vad_max_lag_ms: int = Field(
        2000,
        ge=0,
        description="How far a session's VAD may lag behind its audio before its frames wait (they queue in "
        "its socket, and TCP slows the client). Audio that came while a VAD call was out goes in the next "
        "call as one chunk, so a session catches up at once after a slow call.",
    )
    vad_sessions_per_lane: int = Field(
        50,
        ge=1,
        description="Sessions of one Ingress replica that share a lane (one sticky VADHost call stream); keep "
        "it at the VADHost autoscaling policy's sessions_per_replica so new lanes land on new replicas.",
    )
    max_frame_bytes: int = Field(64_000, description="Largest binary frame accepted (2 s of PCM16).")
    max_utterance_ms: int = Field(30_000, description="Force-cut an utterance that runs this long.")
    min_utterance_ms: int = Field(
        50,
        ge=1,
        description="Drop shorter utterances before they reach the models, and send no result for them: a VAD "
        "end at a force-cut leaves 0 samples, and SenseVoice's fbank raises below about 20 ms (measured), which "
        "failed the whole model batch. 50 ms holds no word.",
    )
    max_upload_bytes: int = Field(
        50_000_000,
        description="Largest uploaded file (transcriptions, enrolment). Uploads are held in memory up to this "
        "size and refused above it; never spooled to disk.",
    )
    max_upload_s: float = Field(
        1800.0,
        description="Longest audio in one /v1/audio/transcriptions file (413 past it): compressed silence "
        "packs hours into a few kB, so bytes alone do not bound the memory a file takes.",
    )
    max_upload_sample_rate: int = Field(
        48_000,
        ge=8_000,
        description="Highest sample rate of an uploaded file (HTTP 400 above it, from the header, before "
        "decoding): a FLAC header may claim 655350 Hz, and decoding costs the file's own rate.",
    )
    max_concurrent_uploads: int = Field(
        2,
        ge=1,
        description="Uploads (/v1/audio/transcriptions and voiceprint enrolments together) one Ingress replica "
        "reads, decodes and recognises at once (each may hold max_upload_bytes and max_upload_s of audio); "
        "more get HTTP 503 with Retry-After.",
    )
    upload_body_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Longest time to receive an upload's whole body (transcription or enrolment): past it, HTTP "
        "408. A client trickling its body would otherwise hold one of max_concurrent_uploads for ever.",
    )
    upload_retry_after_s: int = Field(
        5, ge=1, description="Retry-After (seconds) of the 503 an upload gets while the replica is at its cap."
    )
    max_upload_segments_in_flight: int = Field(
        4,
        ge=1,
        description="Speech segments of one uploaded file being recognised at once: a long file goes to the "
        "models a few segments at a time, never all at once ahead of the live sessions' utterances.",
    )
    speaker_enabled: bool = True
    control_burst: int = Field(
        50, description="Control (text) frames a session may send at once; past it and control_per_s, close 1008."
    )
    control_per_s: float = Field(
        10.0,
        description="Control frames per second a session may keep up. Each costs the ingress a parse and "
        "maybe an answer: an unbounded flood would take its event loop from every other session.",
    )
    max_protocol_errors: int = Field(
        20,
        description="Error frames one session may earn (bad JSON, bad Opus packets, ...) before it is closed "
        "with 1008: a client looping on bad input would otherwise get one answer per frame for ever.",
    )
    max_audio_rate: float | None = Field(
        1.5,
        gt=0,
        description="Seconds of audio a session's pipeline takes per second, measured over rate_window_s (1.5: one "
        "and a half times real time, room for catching up after a stall). Faster audio is paced, not refused: "
        "the session holds it back (and stops reading the socket once max_queued_bytes wait), so a file sent at "
        "full speed is recognised at this rate. Each second of audio costs VAD and model work. null: no bound.",
    )
    max_frames_per_s: float = Field(
        200.0,
        gt=0,
        description="Frames (binary and text) a session may send per second, measured over rate_window_s and "
        "counted as they arrive. 200: 10 ms frames at twice real time. Past it: `too_many_messages`, close 1008.",
    )
    rate_window_s: float = Field(
        20.0,
        gt=0,
        description="Window of max_audio_rate and max_frames_per_s: a session may be this many seconds' worth "
        "ahead at once (a short file sent as fast as the socket allows, a client catching up after a network "
        "stall) before the sustained rate applies.",
    )
    max_queued_bytes: int = Field(
        4_000_000,
        ge=65_536,
        description="Bytes of frames a session may have received but not yet handled (its client far ahead of "
        "the server); past it the session stops reading its socket until it catches up (TCP backpressure slows "
        "the client; nothing is refused). 4 MB: two minutes of 16 kHz PCM.",
    )
    max_text_frame_bytes: int = Field(
        65_536,
        ge=1024,
        description="Largest text frame accepted (JSON control: a Xiaozhi MCP payload is a few kB); past it: "
        "`frame_too_large`, close 1009. The WebSocket layer alone would take 16 MB.",
    )
    max_field_chars: int = Field(
        1024,
        ge=16,
        description="Longest string field of a control frame (speaker_group, wav_name, language, hotwords, ...): "
        "some are echoed in every answer or kept. Past it: `field_too_long`, and the session goes on.",
    )
    max_utterances_in_flight: int = Field(
        4,
        ge=1,
        description="Utterances of one session being recognised at once. Audio that ends more waits for room "
        "(its frames queue, bounded by max_queued_bytes): no session fans out without bound. One VAD call "
        "that ends several utterances (a session catching up) may pass it by those.",
    )
    idle_timeout_s: float = Field(
        300.0, description="Close a session that sends nothing for this long (error `idle_timeout`, close 1000)."
    )
    drain_poll_s: float = Field(2.0, description="How often an ingress replica asks Serve whether it is stopping.")
    healthz_cache_s: float = Field(
        1.0,
        ge=0,
        description="/healthz reuses the Serve controller's answer this long (it is unauthenticated: a flood of "
        "probes shares one controller call, made off the event loop).",
    )
    healthz_timeout_s: float = Field(
        5.0, gt=0, description="/healthz waits this long for the Serve controller, then answers 503 with the reason."
    )
    drain_margin_s: float = Field(
        30.0,
        description="A stopping ingress replica asks its sessions to reconnect (close 1012) this long before "
        "Serve's graceful_shutdown_timeout_s runs out. Before that, sessions go on untouched.",
    )
    drain_idle_wait_s: float = Field(
        10.0,
        description="Once asked to reconnect, a session waits up to this long for the pause after its next "
        "result; after it, an open utterance is cut and transcribed, then the session closes.",
    )

    @model_validator(mode="after")
    def _drain_fits(self) -> IngressSettings:
        if self.drain_idle_wait_s >= self.drain_margin_s:
            raise ValueError("ingress.drain_idle_wait_s must be shorter than ingress.drain_margin_s")
        return self


class AdmissionSettings(_Strict):
    """Who may open a session. Over a cap, a connection is refused at once with a reason."""

    max_sessions_per_replica: int = Field(
        150,
        description="Sessions one Ingress replica holds; more get `server_busy` and close 1013. Keep it below "
        "the Ingress max_ongoing_requests (200), or the proxy queues WebSockets instead of refusing them.",
    )
    max_sessions_total: int | None = Field(
        400, description="Sessions in the whole application (null: no cap); more get `server_busy`, close 1013."
    )
    max_connections_per_device: int | None = Field(
        2,
        description="Open connections per Device-Id (header or query); more get `too_many_connections`, close "
        "1008. Two lets a device reconnect before its old connection has timed out.",
    )
    sessions_per_asr_replica: int | None = Field(
        None,
        ge=1,
        description="Sessions one SenseVoice replica serves within the latency target on this kind of host (the "
        "capacity sweep's 'held' figure). The application admits this many per running SenseVoice replica; more "
        "get `server_busy`, close 1013. null: no such cap (the counts above still apply).",
    )
    max_queue_delay_s: float | None = Field(
        None,
        description="While the oldest finished utterance an Ingress replica waits on has waited longer than this "
        "for SenseVoice, new sessions get `server_busy` (1013): the admitted keep their latency. null: off.",
    )
    # Optional work is shed before devices are refused: interims first, then the speaker model.
    shed_interims_delay_s: float | None = Field(
        None,
        description="While the oldest finished utterance an Ingress replica waits on has waited longer than this "
        "for SenseVoice, no interim (partial) text is computed for its sessions: the model time goes to finals. "
        "null: never shed.",
    )
    shed_speaker_delay_s: float | None = Field(
        None,
        description="Past this queue delay, utterances skip the speaker model: their text goes out with speaker "
        "`unknown`, reason `shed`. null: never shed.",
    )
    lease_s: float = Field(30.0, description="The registry forgets sessions of an Ingress silent this long.")
    sync_s: float = Field(5.0, description="How often each Ingress replica re-syncs its live sessions.")
    registry_timeout_s: float = Field(
        5.0,
        gt=0,
        description="Longest a SessionRegistry call (admit, release, sync) may take. Past it a new session is "
        "admitted unchecked (logged), as when the registry is down; a lost release is corrected by the next sync.",
    )

    @model_validator(mode="after")
    def _shed_before_refusing(self) -> AdmissionSettings:
        """Interims go first, then the speaker model, then new devices are refused."""
        steps = [("shed_interims_delay_s", self.shed_interims_delay_s),
                 ("shed_speaker_delay_s", self.shed_speaker_delay_s),
                 ("max_queue_delay_s", self.max_queue_delay_s)]  # fmt: skip
        given = [(name, value) for name, value in steps if value is not None]
        for (a, x), (b, y) in itertools.pairwise(given):
            if x > y:
                raise ValueError(f"admission.{a} ({x:g}) must not exceed {b} ({y:g}): optional work is shed "
                                 "before devices are refused, interims before the speaker model")  # fmt: skip
        return self


class XiaozhiSettings(_Strict):
    hello_timeout_s: float = Field(10.0, description="Close a connection that sends no hello in this time.")
    hello_audio_params: dict = Field(
        default_factory=lambda: {"format": "opus", "sample_rate": 16000, "channels": 1, "frame_duration": 60},
        description="audio_params in our hello: what we send back to devices (we send no audio).",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_to_security(cls, data: Any) -> Any:
        """Device authentication covers every protocol now: say where the old keys went."""
        moved = sorted(set(data) & set(_MOVED_XIAOZHI_KEYS)) if isinstance(data, dict) else []
        if moved:
            where = ", ".join(f"xiaozhi.{k} -> security.{_MOVED_XIAOZHI_KEYS[k]}" for k in moved)
            raise ValueError(f"device authentication settings moved to `security` ({where})")
        return data


MIN_REDACTED_CHARS = 8  # the log filter masks secrets at least this long; shorter ones would mask plain words
_MOVED_XIAOZHI_KEYS = {
    "auth_enabled": "device_auth (auto | on | off)",
    "secret_env": "device_secret_env",
    "max_token_age_s": "max_token_age_s",
    "allowed_devices": "allowed_devices",
}
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class SecuritySettings(_Strict):
    """Who may connect. Secrets are never settings: only the *names* of the environment
    variables that hold them (`*_env`), so config files can be shared and committed."""

    device_auth: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Device authentication on every device path (Xiaozhi, plain, FunASR, file uploads). "
        "auto: on unless Serve's HTTP host is a loopback address (or cannot be learned).",
    )
    device_secret_env: str = Field(
        DEFAULT_SECRET_ENV, description="Environment variable holding the HMAC secret of device tokens."
    )
    max_token_age_s: int = Field(30 * 24 * 3600, description="Device tokens older than this are refused.")
    allowed_devices: list[str] = Field(default_factory=list, description="Device ids admitted without a token.")
    device_groups: dict[str, str] = Field(
        default_factory=dict,
        description="Speaker group (household) of each device id while device authentication is on; a device "
        "not listed is its own group. Clients cannot choose another (speaker_group must match or be left out).",
    )
    min_secret_chars: int = Field(
        MIN_SECRET_CHARS,
        ge=MIN_REDACTED_CHARS,
        description="Shortest device secret or admin token accepted: a shorter one set in the environment stops "
        "the ingress from starting (and could not be masked in the logs).",
    )
    admin_token_env: str = Field(
        "SPEECH_SERVE_ADMIN_TOKEN", description="Environment variable holding the bearer token of /v1/speakers*."
    )
    bind_host_timeout_s: float = Field(
        10.0, description="How long the ingress waits for Serve's controller to say which host it binds."
    )

    @field_validator("device_secret_env", "admin_token_env")
    @classmethod
    def _names_a_variable(cls, value: str) -> str:
        if not ENV_NAME.match(value):
            raise ValueError(
                "must be the NAME of an environment variable (like SPEECH_SERVE_DEVICE_SECRET): "
                "secrets never go into settings, only the variable that holds them"
            )
        return value


class FunasrSettings(_Strict):
    interim_interval_ms: int = Field(
        600,
        description="online/2pass: re-decode the growing segment this often for interim text. "
        "Interims run at low priority on SenseVoice and never delay final results.",
    )


class RealtimeSettings(_Strict):
    """The OpenAI Realtime transcription endpoint (`/v1/realtime`): how far its clients may move our VAD."""

    min_silence_duration_ms: int = Field(
        200,
        ge=0,
        description="Shortest end-of-utterance silence a client may ask for (turn_detection.silence_duration_ms "
        "is raised to it): shorter splits words at every pause.",
    )
    max_silence_duration_ms: int = Field(
        3000,
        ge=0,
        description="Longest end-of-utterance silence a client may ask for (lowered to it): a longer one holds "
        "the utterance, its audio and its result back that long after the speaker stops.",
    )
    interim_interval_ms: int | None = Field(
        600,
        gt=0,
        description="Re-decode the utterance being spoken this often and send the new text as "
        "conversation.item.input_audio_transcription.delta events (low priority on SenseVoice). null: no deltas.",
    )

    @model_validator(mode="after")
    def _range(self) -> RealtimeSettings:
        if self.min_silence_duration_ms > self.max_silence_duration_ms:
            raise ValueError("realtime.min_silence_duration_ms must not exceed realtime.max_silence_duration_ms")
        return self


class RetrySettings(_Strict):
    """Retries of a call whose replica was lost (SenseVoice, Speaker, VADHost). With one replica
    the retry waits for its replacement: Serve notices the death within the deployment's
    `health_check_period_s` (2 s) and the new replica reloads its model (about 10 s with the test
    models on 2 cores), so the deadline must cover both, with room for a loaded host."""

    deadline_s: float = Field(
        60.0,
        description="Give up on a call this long after its first failure; the utterance then gets "
        "recognition_failed and the session goes on.",
    )
    try_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Longest one try of a call may take, the first included (a retry gets at most what is left "
        "of deadline_s). A replica that takes a call and never answers (wedged, not dead) would otherwise hold "
        "the session's in-order results for ever. A try that runs out is not retried (the request is cancelled "
        "on the replica): the utterance gets recognition_failed, a VAD call closes the session (internal, 1011).",
    )
    backoff_s: float = Field(0.5, description="Wait before the second retry (the first goes at once); doubles after.")
    max_backoff_s: float = Field(5.0, description="Longest wait between two retries.")


PlacementName = Literal["Ingress", "VADHost", "SenseVoice", "Speaker"]


class Placement(_Strict):
    """ray_actor_options for one deployment (and an optional fixed replica count).
    `num_gpus` is dropped on clusters without GPUs.

    These live in the builder args, not in the YAML `deployments:` section, because Serve
    replaces the code's ray_actor_options wholesale with the YAML's, which would pin a GPU
    fraction on a CPU-only cluster and leave replicas pending forever.
    """

    num_cpus: float | None = Field(
        0.0,
        description="CPUs reserved per replica. null (the model deployments' default): the replica's torch "
        "threads, scaled down by the builder when one replica of each deployment would not fit the node.",
    )
    num_gpus: float = 0.0
    memory_mb: int | None = None
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica: steer it to the nodes that offer them (on KubeRay, a "
        "worker group's rayStartParams resources; deploy/kuberay/).",
    )
    num_replicas: int | None = Field(
        None, description="Fixed replica count; leave unset to use autoscaling_config from `deployments:`."
    )

    def deployment_options(self, cluster_has_gpu: bool) -> dict:
        opts: dict = {"ray_actor_options": self.actor_options(cluster_has_gpu)}
        if self.num_replicas is not None:
            opts["num_replicas"] = self.num_replicas
        return opts

    def actor_options(self, cluster_has_gpu: bool) -> dict:
        opts: dict = {"num_cpus": self.num_cpus}
        if cluster_has_gpu and self.num_gpus > 0:
            opts["num_gpus"] = self.num_gpus
        if self.memory_mb:
            opts["memory"] = self.memory_mb * 1024 * 1024
        if self.resources:
            opts["resources"] = dict(self.resources)
        return opts


def _default_placement() -> dict[str, Placement]:
    return {
        "Ingress": Placement(num_cpus=0.1),
        "VADHost": Placement(num_cpus=0.1),
        "SenseVoice": Placement(num_cpus=None, num_gpus=0.25),
        "Speaker": Placement(num_cpus=None, num_gpus=0.15),
    }


class AppSettings(_Strict):
    # Errors name the setting and what is wrong, never the value: it may be a pasted secret.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    models: ModelSettings = ModelSettings()
    vad: VadSettings = VadSettings()
    asr: AsrSettings = AsrSettings()
    speaker: SpeakerSettings = SpeakerSettings()
    voiceprints: VoiceprintSettings = VoiceprintSettings()
    ingress: IngressSettings = IngressSettings()
    admission: AdmissionSettings = AdmissionSettings()
    xiaozhi: XiaozhiSettings = XiaozhiSettings()
    funasr: FunasrSettings = FunasrSettings()
    realtime: RealtimeSettings = RealtimeSettings()
    security: SecuritySettings = SecuritySettings()
    retry: RetrySettings = RetrySettings()
    placement: dict[PlacementName, Placement] = Field(default_factory=_default_placement)
    use_gpus: Literal["auto", "always", "never"] = Field(
        "auto",
        description="auto: the placement's num_gpus apply where the cluster has GPUs when the app is built. "
        "always: they apply even if no GPU node is up yet (a cluster autoscaler adds GPU nodes on demand, "
        "e.g. KubeRay; the replicas wait for them). never: models on CPU even where there are GPUs.",
    )

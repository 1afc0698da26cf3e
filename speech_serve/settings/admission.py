"""Who may open a session, how many the models serve in time, and how calls to lost replicas are
retried."""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from speech_serve.settings.base import Section


class AdmissionSettings(Section):
    """Who may open a session. Over a cap, a connection is refused at once with a reason."""

    max_sessions_per_replica: int = 150
    """Sessions one Ingress replica holds; more get `server_busy` and close 1013. Keep it below the Ingress
    max_ongoing_requests (200), or the proxy queues WebSockets instead of refusing them."""
    max_sessions_total: int | None = 400
    """Sessions in the whole application (null: no cap); more get `server_busy`, close 1013."""
    max_connections_per_device: int | None = 2
    """Open connections per Device-Id (header or query); more get `too_many_connections`, close 1008. Two lets a
    device reconnect before its old connection has timed out."""
    max_queue_delay_s: float | None = None
    """While the oldest finished utterance an Ingress replica waits on has waited longer than this for
    SenseVoice, new sessions get `server_busy` (1013): the admitted keep their latency. null: off."""
    # Optional work is shed before devices are refused: interims first, then the speaker model.
    shed_interims_delay_s: float | None = None
    """While the oldest finished utterance an Ingress replica waits on has waited longer than this for
    SenseVoice, no interim (partial) text is computed for its sessions: the model time goes to finals. null:
    never shed."""
    shed_speaker_delay_s: float | None = None
    """Past this queue delay, utterances skip the speaker model: their text goes out with speaker `unknown`,
    reason `shed`. null: never shed."""
    lease_s: float = 30.0
    """The registry forgets sessions of an Ingress silent this long."""
    sync_s: float = 5.0
    """How often each Ingress replica re-syncs its live sessions."""
    registry_timeout_s: float = Field(5.0, gt=0)
    """Longest a SessionRegistry call (admit, release, sync) may take. Past it a new session is admitted
    unchecked (logged), as when the registry is down; a lost release is corrected by the next sync."""

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "sessions_per_asr_replica" in data:
            raise ValueError("admission.sessions_per_asr_replica moved to compute.sessions_per_asr_replica")
        return data

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


class ComputeSettings(Section):
    """Admission by compute: sessions per SenseVoice replica, derived from the replica's own timing of its
    shapes at start (ingress/capacity.py). The application admits that many per running replica; more get
    `server_busy`, close 1013, before they can slow the admitted down."""

    sessions_per_asr_replica: Annotated[int, Field(ge=1)] | Literal["measured"] | None = "measured"
    """measured: derived from each replica's warm-up timing (reported in /healthz and the start log). A number:
    pinned (a capacity sweep's 'held' over the replicas). null: no compute cap (the session caps still apply)."""
    utilization: float = Field(0.4, gt=0, le=1)
    """Share of a replica's measured speed (one utterance at a time, on the CPUs it reserves) that the admitted
    sessions' speech may take. The rest is headroom: for utterances that end close together, and for the VAD,
    the Ingress and the other replicas on the same cores. At 0.4 the 2-core host held p95 <= 3 s in the capacity
    sweep, speaker on and off (docs/benchmarks.md); a host whose models have cores of their own can take more."""
    speech_share: float = Field(0.6, gt=0, le=1)
    """Share of its time a device is planned to speak (a device in a conversation; the sweep's corpus: 61%)."""
    latency_target_s: float = Field(3.0, gt=0)
    """End of speech to result. A replica never gets more sessions than it could answer in one batch within this
    (less the end silence and `overhead_s`) if all of them ended an utterance at once, at its warm-up speed."""
    overhead_s: float = Field(0.3, ge=0)
    """Of the target, what is not end silence or SenseVoice: VAD chunking and calls, transport, the way back."""
    warmup_utterance_s: float = Field(3.0, gt=0)
    """Length of each utterance a replica times at start (one alone, then a batch of max_batch_size)."""


class RetrySettings(Section):
    """Retries of a call whose replica was lost (SenseVoice, Speaker, VADHost). With one replica
    the retry waits for its replacement: Serve notices the death within the deployment's
    `health_check_period_s` (2 s) and the new replica reloads its model (about 10 s with the test
    models on 2 cores), so the deadline must cover both, with room for a loaded host."""

    deadline_s: float = 60.0
    """Give up on a call this long after its first failure; the utterance then gets recognition_failed and the
    session goes on."""
    try_timeout_s: float = Field(60.0, gt=0)
    """Longest one try of a call may take, the first included (a retry gets at most what is left of deadline_s).
    A replica that takes a call and never answers (wedged, not dead) would otherwise hold the session's in-order
    results for ever. A try that runs out is not retried (the request is cancelled on the replica): the utterance
    gets recognition_failed, a VAD call closes the session (internal, 1011)."""
    backoff_s: float = 0.5
    """Wait before the second retry (the first goes at once); doubles after."""
    max_backoff_s: float = 5.0
    """Longest wait between two retries."""

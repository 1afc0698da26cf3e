"""Admission by compute: refuse a new session when the models could not serve it in time.

Two signals, both cheap, both pure here (the Ingress feeds them):
- **Sessions per model replica** (`compute.sessions_per_asr_replica`). By default measured: each
  SenseVoice replica times its own shapes at start (`ModelTiming`: one utterance, then a batch),
  and `sessions_for` turns that into the sessions whose speech it keeps up with at
  `compute.utilization` of its speed. Summed over the running replicas, it caps
  the application's sessions (the registry counts them cluster-wide): predictive, so a burst of
  devices arriving at once is refused at the door instead of degrading everyone admitted. A
  number pins it; null turns it off.
- **Queue delay** (`admission.max_queue_delay_s`): while the oldest utterance this Ingress is
  waiting on (its `Backlog`, stream/calls.py) has waited longer than this for SenseVoice, new
  sessions are refused: reactive, for what the prediction misses (a slower host, longer
  utterances, a lost replica). It reads the queue as it is now, so it lets sessions in again the
  moment the backlog is gone.

Refusals are `server_busy` with close 1013 (try again later), the same as the session caps.

Before refusing anyone, the same backlog sheds optional work for the admitted
(`admission.shed_interims_delay_s`, then `shed_speaker_delay_s`): interim text first, then the
speaker model (the result says speaker `unknown`, reason `shed`). Both come back on their own once
the queue is short again.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

from speech_serve.ingress.stream.calls import Backlog
from speech_serve.messages import ModelTiming, Refusal
from speech_serve.settings import AdmissionSettings, ComputeSettings, VadSettings
from speech_serve.wire.codes import CLOSE_TRY_AGAIN_LATER


@dataclass(frozen=True)
class ReplicaSessions:
    """The sessions one replica serves in time, the two bounds behind it, and why."""

    sessions: int
    by_rate: int  # their speech within `utilization` of the replica's speed
    by_burst: int  # all of them ending an utterance at once, answered in batches within the target
    why: str


def sessions_for(timing: ModelTiming, compute: ComputeSettings, end_silence_s: float) -> ReplicaSessions:
    """Sessions one SenseVoice replica serves within the latency target, from its warm-up timing.

    - rate: the replica's speed is the speech it transcribes per second one utterance at a time (batches
      in service are small), on the CPUs Ray reserved for it where that is less than its threads. The
      sessions' speech (`speech_share` of their time) may take `utilization` of it.
    - burst, a guard for slow hosts: every session ending an utterance at once, answered in batches of
      `timing.batch` at the warm-up's fastest batch time, the last within the target less the end
      silence and the pipeline's overhead.
    """
    share = min(1.0, timing.cpus / timing.threads) if timing.cpus else 1.0
    speed = timing.utterance_s / timing.single_s * share  # speech-seconds per second
    by_rate = max(1, math.floor(compute.utilization * speed / compute.speech_share))
    budget_s = compute.latency_target_s - end_silence_s - compute.overhead_s
    batch_s = timing.batch_s / share
    by_burst = max(1, math.floor(timing.batch * budget_s / batch_s)) if budget_s > 0 else 1
    sessions = min(by_rate, by_burst)
    why = (f"{timing.utterance_s:g} s of speech in {timing.single_s:.3f} s alone: {speed:.1f} speech-s/s "
           f"on {share:.2g} of its threads' cores; {by_rate} at {compute.utilization:.0%} of it, "
           f"{by_burst} by a burst of {timing.batch} in {batch_s:.2f} s within {budget_s:.2f} s")  # fmt: skip
    return ReplicaSessions(sessions, by_rate, by_burst, why)


class ComputeAdmission:
    def __init__(self, settings: AdmissionSettings, backlog: Backlog | None = None,
                 compute: ComputeSettings | None = None, end_silence_s: float | None = None):  # fmt: skip
        self.settings = settings
        self.compute = compute or ComputeSettings()
        self.end_silence_s = VadSettings().max_end_silence_ms / 1000 if end_silence_s is None else end_silence_s
        self.backlog = backlog or Backlog(settings)
        self.asr_replicas = 1  # running SenseVoice replicas, refreshed by the Ingress
        self.running: set[str] | None = None  # their ids, where known
        self.timings: dict[str, ModelTiming] = {}  # replica id -> its warm-up timing

    @property
    def off(self) -> bool:
        return self.compute.sessions_per_asr_replica is None

    @property
    def measured(self) -> bool:
        return self.compute.sessions_per_asr_replica == "measured"

    def known(self) -> bool:
        """Whether the cap can be computed: the replicas counted and, when measured, one heard from."""
        return self.running is not None and (not self.measured or bool(self.timings))

    def complete(self) -> bool:
        """Whether a replica runs, and every running one is counted and, when measured, heard from."""
        return bool(self.running) and (not self.measured or self.running <= set(self.timings))

    def replica_seen(self, timing: ModelTiming) -> None:
        self.timings[timing.replica] = timing

    def replicas_running(self, ids: set[str]) -> None:
        self.running, self.asr_replicas = ids, len(ids)
        for gone in set(self.timings) - ids:  # a replica that stopped no longer counts
            del self.timings[gone]

    def per_replica_for(self, timing: ModelTiming) -> ReplicaSessions:
        return sessions_for(timing, self.compute, self.end_silence_s)

    def per_replica(self) -> dict[str, ReplicaSessions]:
        return {rid: self.per_replica_for(t) for rid, t in self.timings.items()}

    def sessions_cap(self) -> int | None:
        """The application's sessions the running model replicas serve in time (None: no cap)."""
        pinned = self.compute.sessions_per_asr_replica
        if pinned is None:
            return None
        if not self.measured:
            return pinned * max(self.asr_replicas, 1)
        known = self.per_replica()
        if not known:  # no replica has answered yet: the queue-delay guard alone
            return None
        running = self.running if self.running is not None else set(known)
        typical = statistics.median_low([r.sessions for r in known.values()])
        # a running replica not heard from yet counts as a typical one; none running: one's worth
        return sum(known[rid].sessions if rid in known else typical for rid in running) or typical

    def report(self) -> dict:
        """What /healthz shows: the cap, how it was derived, and each replica's timing."""
        pinned = self.compute.sessions_per_asr_replica
        if not self.measured:
            how = "off" if pinned is None else "pinned"
            return {"how": how, "sessions_per_asr_replica": pinned, "cap": self.sessions_cap()}
        per = self.per_replica()
        return {
            "how": "measured", "cap": self.sessions_cap(), "running_replicas": self.asr_replicas,
            "replicas": {rid: {"sessions": r.sessions, "why": r.why, "timing": asdict(self.timings[rid])}
                         for rid, r in per.items()},
        }  # fmt: skip

    def refusal(self) -> Refusal | None:
        """This Ingress's answer before the registry's count: are the models keeping up now?"""
        limit = self.settings.max_queue_delay_s
        delay = self.backlog.queue_delay_s()
        if limit is None or delay <= limit:
            return None
        return Refusal("server_busy", f"the speech models are behind (an utterance has waited {delay:.1f} s); "
                       "retry in a few seconds", CLOSE_TRY_AGAIN_LATER)  # fmt: skip

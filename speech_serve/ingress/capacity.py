"""Admission by compute: refuse a new session when the models could not serve it in time.

Two signals, both cheap, both pure here (the Ingress feeds them):
- **Capacity per model replica** (`admission.sessions_per_asr_replica`): sessions one SenseVoice
  replica serves within the latency target, as the capacity sweep measures it for the host
  (`python -m speech_serve.loadtest.sweep`, "held"). Times the running SenseVoice replicas, it caps the
  application's sessions (the registry counts them cluster-wide): predictive, so a burst of
  devices arriving at once is refused at the door instead of degrading everyone admitted.
- **Queue delay** (`admission.max_queue_delay_s`): while the oldest utterance this Ingress is
  waiting on (its `Backlog`, stream/calls.py) has waited longer than this for SenseVoice, new
  sessions are refused: reactive, for
  what the static figure misses (a slower host, longer utterances, a lost replica). It reads the
  queue as it is now, so it lets sessions in again the moment the backlog is gone.

Refusals are `server_busy` with close 1013 (try again later), the same as the session caps.

Before refusing anyone, the same backlog sheds optional work for the admitted
(`admission.shed_interims_delay_s`, then `shed_speaker_delay_s`): interim text first, then the
speaker model (the result says speaker `unknown`, reason `shed`). Both come back on their own once
the queue is short again.
"""

from __future__ import annotations

from speech_serve.ingress.stream.calls import Backlog
from speech_serve.messages import Refusal
from speech_serve.settings import AdmissionSettings
from speech_serve.wire.codes import CLOSE_TRY_AGAIN_LATER


class ComputeAdmission:
    def __init__(self, settings: AdmissionSettings, backlog: Backlog | None = None):
        self.settings = settings
        self.backlog = backlog or Backlog(settings)
        self.asr_replicas = 1  # running SenseVoice replicas, refreshed by the Ingress

    def sessions_cap(self) -> int | None:
        """The application's sessions the running model replicas serve in time (None: no cap)."""
        per_replica = self.settings.sessions_per_asr_replica
        return None if per_replica is None else per_replica * max(self.asr_replicas, 1)

    def refusal(self) -> Refusal | None:
        """This Ingress's answer before the registry's count: are the models keeping up now?"""
        limit = self.settings.max_queue_delay_s
        delay = self.backlog.queue_delay_s()
        if limit is None or delay <= limit:
            return None
        return Refusal("server_busy", f"the speech models are behind (an utterance has waited {delay:.1f} s); "
                       "retry in a few seconds", CLOSE_TRY_AGAIN_LATER)  # fmt: skip

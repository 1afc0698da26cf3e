"""Admission by compute: refuse a new session when the models could not serve it in time.

Two signals, both cheap, both pure here (the Ingress feeds them):
- **Capacity per model replica** (`admission.sessions_per_asr_replica`): sessions one SenseVoice
  replica serves within the latency target, as the capacity sweep measures it for the host
  (`python -m speech_serve.loadtest.sweep`, "held"). Times the running SenseVoice replicas, it caps the
  application's sessions (the registry counts them cluster-wide): predictive, so a burst of
  devices arriving at once is refused at the door instead of degrading everyone admitted.
- **Queue delay** (`admission.max_queue_delay_s`): while the oldest utterance this Ingress is
  waiting on has waited longer than this for SenseVoice, new sessions are refused: reactive, for
  what the static figure misses (a slower host, longer utterances, a lost replica). It reads the
  queue as it is now, so it lets sessions in again the moment the backlog is gone.

Refusals are `server_busy` with close 1013 (try again later), the same as the session caps.

Before refusing anyone, the same queue delay sheds optional work for the admitted
(`admission.shed_interims_delay_s`, then `shed_speaker_delay_s`): interim text first, then the
speaker model (the result says speaker `unknown`, reason `shed`). Both come back on their own once
the queue is short again.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from speech_serve.messages import CLOSE_TRY_AGAIN_LATER, Refusal
from speech_serve.settings import AdmissionSettings

SHEDDABLE = ("interim", "speaker")  # optional work, in the order it is shed


class ComputeAdmission:
    def __init__(
        self,
        settings: AdmissionSettings,
        clock: Callable[[], float] = time.monotonic,
        on_shed: Callable[[str], None] | None = None,
    ):
        self.settings = settings
        self._clock = clock
        self._on_shed = on_shed  # told each time a piece of optional work is skipped (metrics)
        self._shed_after = {"interim": settings.shed_interims_delay_s, "speaker": settings.shed_speaker_delay_s}
        self._waiting: dict[int, float] = {}  # final transcriptions in flight: token -> when sent
        self._tokens = itertools.count()
        self.asr_replicas = 1  # running SenseVoice replicas, refreshed by the Ingress

    @contextmanager
    def waiting_for_asr(self) -> Iterator[None]:
        """Around one final transcription call: it counts as waiting until its answer."""
        token = next(self._tokens)
        self._waiting[token] = self._clock()
        try:
            yield
        finally:
            del self._waiting[token]

    def queue_delay_s(self) -> float:
        """How long the oldest final in flight has waited (0 with none)."""
        oldest = min(self._waiting.values(), default=None)
        return 0.0 if oldest is None else self._clock() - oldest

    def shedding(self) -> list[str]:
        """The optional work shed now (in SHEDDABLE's order)."""
        delay = self.queue_delay_s()
        return [what for what in SHEDDABLE if (limit := self._shed_after[what]) is not None and delay > limit]

    def shed(self, what: str) -> bool:
        """Skip this piece of optional work (`interim`, `speaker`) now? Counted when it is."""
        limit = self._shed_after[what]
        if limit is None or self.queue_delay_s() <= limit:
            return False
        if self._on_shed is not None:
            self._on_shed(what)
        return True

    def sessions_cap(self) -> int | None:
        """The application's sessions the running model replicas serve in time (None: no cap)."""
        per_replica = self.settings.sessions_per_asr_replica
        return None if per_replica is None else per_replica * max(self.asr_replicas, 1)

    def refusal(self) -> Refusal | None:
        """This Ingress's answer before the registry's count: are the models keeping up now?"""
        limit = self.settings.max_queue_delay_s
        delay = self.queue_delay_s()
        if limit is None or delay <= limit:
            return None
        return Refusal("server_busy", f"the speech models are behind (an utterance has waited {delay:.1f} s); "
                       "retry in a few seconds", CLOSE_TRY_AGAIN_LATER)  # fmt: skip

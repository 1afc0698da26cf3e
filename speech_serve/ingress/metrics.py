"""The Ingress's Prometheus metrics, exported by Ray's metrics agent with the `ray_` prefix
(the replicas' are in speech_serve/replicas/metrics.py).

Serve adds `application`, `deployment` and `replica` tags to each one. `config/grafana/
speech-serve.json` charts them; tests check that every series it queries is defined here or there.
Recording works without Ray (the calls are then no-ops), so the plain classes that record
stay testable without Serve.
"""

from __future__ import annotations

from ray.serve import metrics

from speech_serve.messages import UtteranceResult

# Milliseconds from end of speech to result, and per stage: 25 ms to 25 s.
LATENCY_BOUNDARIES_MS = [25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600]

# name -> help text, for every metric we export (the Grafana dashboard test reads this).
DEFINED = {
    "speech_live_sessions": "Live WebSocket sessions on this ingress replica, by protocol.",
    "speech_sessions_total": "Sessions admitted, by protocol.",
    "speech_sessions_rejected_total": "Sessions refused at connect, by protocol and reason.",
    "speech_sessions_reconnect_total": "Sessions asked to reconnect because their ingress replica is stopping.",
    "speech_utterances_total": "Utterances answered, by protocol and outcome (ok or failed).",
    "speech_result_latency_ms": "End of speech to result sent, at the server (VAD endpointing included).",
    "speech_stage_latency_ms": "Round trip per pipeline stage (vad call, asr, speaker) seen by the ingress.",
    "speech_shed_total": "Optional work skipped because the models were behind, by kind (interim, speaker).",
    "speech_compute_sessions_cap": "Sessions the running SenseVoice replicas serve in time (admission by compute), "
    "as this ingress replica derives it; absent while no cap applies.",
}


class IngressMetrics:
    """Sessions and utterances as the ingress sees them."""

    def __init__(self) -> None:
        d = DEFINED
        self.live = metrics.Gauge("speech_live_sessions", d["speech_live_sessions"], tag_keys=("protocol",))
        self.admitted = metrics.Counter("speech_sessions_total", d["speech_sessions_total"], tag_keys=("protocol",))
        self.rejected = metrics.Counter(
            "speech_sessions_rejected_total", d["speech_sessions_rejected_total"], tag_keys=("protocol", "reason")
        )
        self.reconnects = metrics.Counter(
            "speech_sessions_reconnect_total", d["speech_sessions_reconnect_total"], tag_keys=("protocol",)
        )
        self.utterances = metrics.Counter(
            "speech_utterances_total", d["speech_utterances_total"], tag_keys=("protocol", "outcome")
        )
        self.result_latency = metrics.Histogram(
            "speech_result_latency_ms", d["speech_result_latency_ms"], LATENCY_BOUNDARIES_MS, tag_keys=("protocol",)
        )
        self.stage_latency = metrics.Histogram(
            "speech_stage_latency_ms", d["speech_stage_latency_ms"], LATENCY_BOUNDARIES_MS, tag_keys=("stage",)
        )
        self.shed_total = metrics.Counter("speech_shed_total", d["speech_shed_total"], tag_keys=("kind",))
        self.compute_cap = metrics.Gauge("speech_compute_sessions_cap", d["speech_compute_sessions_cap"])

    def sessions_now(self, by_protocol: dict[str, int]) -> None:
        for protocol, count in by_protocol.items():
            self.live.set(count, tags={"protocol": protocol})

    def session_admitted(self, protocol: str) -> None:
        self.admitted.inc(tags={"protocol": protocol})

    def session_rejected(self, protocol: str, reason: str) -> None:
        self.rejected.inc(tags={"protocol": protocol, "reason": reason})

    def session_reconnect(self, protocol: str) -> None:
        self.reconnects.inc(tags={"protocol": protocol})

    def utterance_failed(self, protocol: str) -> None:
        self.utterances.inc(tags={"protocol": protocol, "outcome": "failed"})

    def utterance_answered(self, protocol: str, result: UtteranceResult) -> None:
        self.utterances.inc(tags={"protocol": protocol, "outcome": "ok"})
        lat = result.latency_ms
        if "server_ms" in lat:  # streams only, not whole files; endpoint_ms is 0 for push-to-talk
            self.result_latency.observe(lat["server_ms"] + lat.get("endpoint_ms", 0.0), tags={"protocol": protocol})
        for stage in ("asr", "speaker"):
            if f"{stage}_ms" in lat:
                self.stage_latency.observe(lat[f"{stage}_ms"], tags={"stage": stage})

    def compute_cap_now(self, cap: int | None) -> None:
        if cap is not None:
            self.compute_cap.set(cap)

    def shed(self, kind: str) -> None:
        self.shed_total.inc(tags={"kind": kind})

    def vad_call(self, ms: float) -> None:
        self.stage_latency.observe(ms, tags={"stage": "vad"})

"""The replicas' Prometheus metrics (the Ingress's are in speech_serve/ingress/metrics.py), exported
by Ray's metrics agent with the `ray_` prefix; `config/grafana/speech-serve.json` charts them."""

from __future__ import annotations

from ray.serve import metrics

BATCH_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]

# name -> help text, for every metric the replicas export (the Grafana dashboard test reads this).
DEFINED = {
    "speech_vad_sessions": "Sessions holding VAD state on this VADHost replica.",
    "speech_batch_size": "Requests per model batch, by model and kind (final or interim).",
}


class VadMetrics:
    def __init__(self) -> None:
        self.sessions = metrics.Gauge("speech_vad_sessions", DEFINED["speech_vad_sessions"])

    def sessions_now(self, count: int) -> None:
        self.sessions.set(count)


class BatchMetrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.sizes = metrics.Histogram(
            "speech_batch_size", DEFINED["speech_batch_size"], BATCH_BOUNDARIES, tag_keys=("model", "kind")
        )

    def batch(self, size: int, kind: str) -> None:
        self.sizes.observe(size, tags={"model": self.model, "kind": kind})

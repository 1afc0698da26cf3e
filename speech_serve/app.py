"""The app builder: typed settings in, a bound Serve application out. The only module that sees
both the Ingress side (speech_serve/ingress/) and the replicas (speech_serve/replicas/).

`config/serve.yaml` points `import_path` at `speech_serve.app:build_app` and passes `args`.
Each deployment gets its options from `settings.DEFAULT_DEPLOYMENT_OPTIONS` plus its `placement` (CPU
and GPU fractions, decided here from the cluster's resources, so one config runs on GPU and CPU
hosts; `use_gpus` overrides that); the YAML's `deployments:` section overrides both.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.serve import Application

from speech_serve.ingress.routes import Ingress
from speech_serve.replicas.asr import SenseVoice
from speech_serve.replicas.models import resolve_models
from speech_serve.replicas.registry import SessionRegistry
from speech_serve.replicas.speaker import Speaker
from speech_serve.replicas.vad import VADHost
from speech_serve.settings import DEFAULT_DEPLOYMENT_OPTIONS, AppSettings

logger = logging.getLogger("ray.serve")


def cluster_has_gpu() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def gpus_apply(settings: AppSettings) -> bool:
    """Whether the placement's num_gpus go into ray_actor_options (settings.use_gpus)."""
    return cluster_has_gpu() if settings.use_gpus == "auto" else settings.use_gpus == "always"


def largest_node_cpus() -> float | None:
    if not ray.is_initialized():
        return None
    cpus = [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
    return max(cpus) if cpus else None


def fit_model_cpus(settings: AppSettings, node_cpus: float | None) -> tuple[dict[str, float], str]:
    """CPUs each model replica reserves where its placement says null (auto), and why.

    A replica reserves what it uses, its torch threads, so Serve never stacks a second model
    replica on cores the first one saturates: on a full node the autoscaler's extra replicas
    wait (a cluster autoscaler adds a node for them) instead of loading for minutes and adding
    no compute. When one replica of each deployment would not fit the largest node, the model
    reservations shrink together to what is left (threads stay: `make serve` starts on 2 cores).
    """
    want = {"SenseVoice": float(settings.asr.threads),
            "Speaker": float(settings.speaker.threads) if settings.speaker.enabled else 0.0}  # fmt: skip
    want = {name: cpus for name, cpus in want.items() if settings.placement[name].num_cpus is None}
    if not want:
        return {}, ""
    light = sum(p.num_cpus or 0.0 for name, p in settings.placement.items() if name not in want)
    room = None if node_cpus is None else max(node_cpus - light, 0.1)
    if room is None or sum(want.values()) <= room:
        return want, "one CPU per torch thread"
    scale = room / sum(want.values())
    fitted = {name: round(cpus * scale, 2) for name, cpus in want.items()}
    return fitted, f"torch threads, scaled to fit one replica of each on a {node_cpus:g}-CPU node"


def build_app(args: dict[str, Any] | None = None) -> Application:
    settings = AppSettings(**(args or {}))
    gpu = gpus_apply(settings)
    model_cpus, why = fit_model_cpus(settings, largest_node_cpus())
    for name, cpus in model_cpus.items():
        logger.info("placement: a %s replica reserves %g CPUs (%s)", name, cpus, why)
    models = resolve_models(settings.models)
    for source in (models.vad, models.asr, models.speaker):
        logger.info("model %-7s %s", source.role, source.describe())
    if models.warning():
        banner = "!" * 100
        logger.warning("\n%s\n%s\n%s", banner, models.warning(), banner)
        print(f"\n{banner}\n{models.warning()}\n{banner}\n", flush=True)

    def placed(deployment, name: str):
        options = dict(DEFAULT_DEPLOYMENT_OPTIONS[name])
        if name in settings.placement:
            placement = settings.placement[name]
            if placement.num_cpus is None:
                placement = placement.model_copy(update={"num_cpus": model_cpus.get(name, 0.0)})
            options |= placement.deployment_options(gpu)
        return deployment.options(**options)

    vad = placed(VADHost, "VADHost").bind(models.vad, settings.vad)
    asr = placed(SenseVoice, "SenseVoice").bind(models.asr, settings.asr)
    speaker = placed(Speaker, "Speaker").bind(models.speaker, settings.speaker, settings.voiceprints)
    registry = placed(SessionRegistry, "SessionRegistry").bind(settings.admission)  # no model, no placement
    summary = models.summary(settings.asr.quantize, settings.asr.quantized_engine)
    return placed(Ingress, "Ingress").bind(vad, asr, speaker, registry, settings, summary)


def free_port() -> int:
    """A TCP port nobody listens on now (for local test and benchmark services)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_local(args: dict[str, Any], port: int, name: str = "speech", num_cpus: int | None = None) -> str:
    """Start Ray and Serve in this process and deploy the app (tests and benchmarks).

    Returns host:port. `serve run config/serve.yaml` is the way to run the service itself.
    """
    from ray import serve

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name=name, route_prefix="/")
    return f"127.0.0.1:{port}"

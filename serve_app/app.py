"""The app builder: typed settings in, a bound Serve application out.

`config/serve.yaml` points `import_path` at `serve_app.app:build_app` and passes `args`.
Placement (CPU and GPU fractions) is decided here from the cluster's resources, so one
config runs on GPU and CPU hosts.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray.serve import Application

from deployments.asr import SenseVoice
from deployments.registry import SessionRegistry
from deployments.speaker import Speaker
from deployments.vad import VADHost
from serve_app.ingress import Ingress
from serve_app.models import resolve_models
from serve_app.settings import AppSettings

logger = logging.getLogger("ray.serve")


def cluster_has_gpu() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(args: dict[str, Any] | None = None) -> Application:
    settings = AppSettings(**(args or {}))
    gpu = cluster_has_gpu()
    models = resolve_models(settings.models)
    for source in (models.vad, models.asr, models.speaker):
        logger.info("model %-7s %s", source.role, source.describe())
    if models.warning():
        banner = "!" * 100
        logger.warning("\n%s\n%s\n%s", banner, models.warning(), banner)
        print(f"\n{banner}\n{models.warning()}\n{banner}\n", flush=True)

    def placed(deployment, name: str, **options):
        return deployment.options(**settings.placement[name].deployment_options(gpu), **options)

    # Internal calls write no access-log line each: a VADHost takes 5 calls per second per session,
    # and every line costs CPU in the replica and in `serve run`, which echoes it. The Ingress
    # (HTTP and WebSocket requests from clients) keeps its access log.
    quiet = {"logging_config": {"enable_access_log": False}}
    vad = placed(VADHost, "VADHost", **quiet).bind(models.vad, settings.vad)
    asr = placed(SenseVoice, "SenseVoice", **quiet).bind(models.asr, settings.asr)
    speaker = placed(Speaker, "Speaker", **quiet).bind(models.speaker, settings.speaker, settings.voiceprints)
    registry = SessionRegistry.options(**quiet).bind(settings.admission)  # no model: 0 CPUs, 1 replica
    return placed(Ingress, "Ingress").bind(vad, asr, speaker, registry, settings, models)


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

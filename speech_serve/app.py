"""The app builder: typed settings in, a bound Serve application out. The only module that sees
both the Ingress side (speech_serve/ingress/) and the replicas (speech_serve/replicas/).

`config/serve.yaml` points `import_path` at `speech_serve.app:build_app` and passes `args`.
Each deployment gets its options from `settings.DEFAULT_DEPLOYMENT_OPTIONS`, its `placement` (CPU
and GPU fractions: GPU ones apply only where the cluster has GPUs, `use_gpus` overrides that) and
the host plan (speech_serve/sizing.py: model replicas, threads and reservations for the nodes it
sees, so one config runs on any host); the YAML's `deployments:` section overrides all three.
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
from speech_serve.sizing import HostPlan, ModelPlan, Node, plan_host

logger = logging.getLogger("ray.serve")


def cluster_has_gpu() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def gpus_apply(settings: AppSettings) -> bool:
    """Whether the placement's num_gpus go into ray_actor_options (settings.use_gpus)."""
    return cluster_has_gpu() if settings.use_gpus == "auto" else settings.use_gpus == "always"


def alive_nodes() -> list[Node]:
    if not ray.is_initialized():
        return []
    return [Node.from_ray(node) for node in ray.nodes() if node.get("Alive")]


def planned(settings: AppSettings, plan: HostPlan) -> AppSettings:
    """The settings with the plan's choices where they left the builder to choose: torch threads
    and the model replicas' CPU reservations."""
    asr = settings.asr.model_copy(update={"threads": plan.asr.threads})
    speaker = settings.speaker.model_copy(update={"threads": plan.speaker.threads if plan.speaker else 1})
    placement = dict(settings.placement)
    for name, model in (("SenseVoice", plan.asr), ("Speaker", plan.speaker)):
        if placement[name].num_cpus is None:
            num_cpus = model.num_cpus if model is not None and model.num_cpus is not None else 0.0
            placement[name] = placement[name].model_copy(update={"num_cpus": num_cpus})
    return settings.model_copy(update={"asr": asr, "speaker": speaker, "placement": placement})


def deployment_options(name: str, settings: AppSettings, plan: HostPlan, gpu: bool) -> dict[str, Any]:
    """The code's options table, the log encoding, the placement, and the plan's replica counts; the YAML's
    `deployments:` entry for the deployment overrides all of these (Serve applies it)."""
    options = settings.logging.apply(dict(DEFAULT_DEPLOYMENT_OPTIONS[name]))
    if name not in settings.placement:
        return options
    placement = settings.placement[name]
    options |= placement.deployment_options(gpu)
    model = {"SenseVoice": plan.asr, "Speaker": plan.speaker}.get(name)
    if name == "Speaker" and model is None:  # the speaker model is off: one idle replica answers enrolment's 503
        model = ModelPlan(threads=1, num_cpus=0.0, replicas=1)
    autoscaling = model.autoscaling() if model is not None else None
    if autoscaling is not None and placement.num_replicas is None:
        options["autoscaling_config"] = autoscaling
    return options


def build_app(args: dict[str, Any] | None = None) -> Application:
    settings = AppSettings(**(args or {}))
    gpu = gpus_apply(settings)
    plan = plan_host(alive_nodes(), settings, gpu)
    for reason in plan.reasons:
        logger.info("sizing: %s", reason)
    settings = planned(settings, plan)
    models = resolve_models(settings.models)
    for source in (models.vad, models.asr, models.speaker):
        logger.info("model %-7s %s", source.role, source.describe())
    if models.warning():
        banner = "!" * 100
        logger.warning("\n%s\n%s\n%s", banner, models.warning(), banner)
        print(f"\n{banner}\n{models.warning()}\n{banner}\n", flush=True)

    def placed(deployment, name: str):
        return deployment.options(**deployment_options(name, settings, plan, gpu))

    vad = placed(VADHost, "VADHost").bind(models.vad, settings.vad)
    asr = placed(SenseVoice, "SenseVoice").bind(models.asr, settings.asr, settings.compute)
    speaker = placed(Speaker, "Speaker").bind(models.speaker, settings.speaker, settings.voiceprints)
    registry = placed(SessionRegistry, "SessionRegistry").bind(settings.admission)  # no model, no placement
    summary = models.summary(plan.quantize, settings.asr.quantized_engine)
    return placed(Ingress, "Ingress").bind(vad, asr, speaker, registry, settings, summary, plan.as_dict())


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

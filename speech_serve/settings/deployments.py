"""Serve's options per deployment, stated once, and where each replica is placed.

`DEFAULT_DEPLOYMENT_OPTIONS` is the one table: the builder applies it (with `placement`), and a
deployment's entry under `deployments:` in config/serve.yaml overrides it, as Serve's config always
does. That section therefore holds only what a deployer tunes there: autoscaling_config, and
user_config when changed live (`speech-serve scale`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from speech_serve.settings.base import Section
from speech_serve.settings.speech import BatchSettings

# Internal calls write no access-log line each: a VADHost takes 5 calls per second per session, and every
# line costs CPU in the replica and in `serve run`, which echoes it. The Ingress (HTTP and WebSocket requests
# from clients) keeps its access log.
QUIET = {"logging_config": {"enable_access_log": False}}
DEFAULT_DEPLOYMENT_OPTIONS: dict[str, dict[str, Any]] = {
    # Each live WebSocket holds one request: Serve's default cap of 5 would queue the 6th session
    # (and /healthz) in the proxy. A stopping replica's sessions may go on for the grace period (drain.*).
    "Ingress": {"max_ongoing_requests": 200, "graceful_shutdown_timeout_s": 600},
    # Short calls from many sessions, each lane pinned to its replica by the lane router.
    "VADHost": {
        "max_ongoing_requests": 1000,
        "health_check_period_s": 2,
        "request_router_config": {"request_router_class": "speech_serve.replicas.lane_router:LaneRouter"},
        **QUIET,
    },
    # Utterances queue here to be batched. health_check_period_s: a dead replica is noticed (and
    # replaced) within 2 s instead of Serve's 10; its callers wait for the replacement.
    "SenseVoice": {"max_ongoing_requests": 64, "health_check_period_s": 2,
                   "user_config": BatchSettings().model_dump(), **QUIET},  # fmt: skip
    "Speaker": {"max_ongoing_requests": 64, "health_check_period_s": 2,
                "user_config": BatchSettings().model_dump(), **QUIET},  # fmt: skip
    # One replica, no model: its state is a dict, so it must not be scaled out.
    "SessionRegistry": {
        "num_replicas": 1,
        "max_ongoing_requests": 1000,
        "ray_actor_options": {"num_cpus": 0},
        **QUIET,
    },
}

PlacementName = Literal["Ingress", "VADHost", "SenseVoice", "Speaker"]


class Placement(Section):
    """ray_actor_options for one deployment (and an optional fixed replica count).
    `num_gpus` is dropped on clusters without GPUs.

    These live in the builder args, not in the YAML `deployments:` section, because Serve
    replaces the code's ray_actor_options wholesale with the YAML's, which would pin a GPU
    fraction on a CPU-only cluster and leave replicas pending forever.
    """

    num_cpus: float | None = 0.0
    """CPUs reserved per replica. null (the model deployments' default): the builder's host plan
    (speech_serve/sizing.py: the node's cores the rest leaves, shared by the replicas it plans)."""
    num_gpus: float = 0.0
    """GPU fraction per replica; applied only where the cluster has GPUs."""
    memory_mb: int | None = None
    """Memory reserved per replica (Ray's `memory`), in MiB."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Custom Ray resources per replica: steer it to the nodes that offer them (on KubeRay, a worker group's
    rayStartParams resources; deploy/kuberay/)."""
    num_replicas: int | None = None
    """Fixed replica count; leave unset to use autoscaling_config from `deployments:`."""

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


def default_placement() -> dict[str, Placement]:
    return {
        "Ingress": Placement(num_cpus=0.1),
        "VADHost": Placement(num_cpus=0.1),
        "SenseVoice": Placement(num_cpus=None, num_gpus=0.25),
        "Speaker": Placement(num_cpus=None, num_gpus=0.15),
    }


class SizingSettings(Section):
    """How the builder sizes the model replicas for the nodes it sees (speech_serve/sizing.py), where
    `asr.threads`, `speaker.threads` and the models' `placement` leave it to choose."""

    spare_cores_fraction: float = Field(0.05, ge=0, lt=1)
    """Of each node's CPUs, what no replica reserves: Serve's proxy and controller, Ray, the OS."""
    speaker_share: float = Field(0.35, gt=0, lt=1)
    """Of the cores left for the models, the Speaker's when it runs. CAM++ used 0.31 cores to SenseVoice's 0.52
    (int8) at 16 devices (docs/benchmarks.md)."""
    gpu_threads: int = Field(2, ge=1)
    """CPU threads of a model replica on a GPU (the frontend's fbank and the decoding run on the CPU), where
    `asr.threads` / `speaker.threads` leave it to the plan."""
    gpu_target_ongoing_requests: int = Field(16, ge=1)
    """On GPU nodes, where the model replicas autoscale: queued utterances per replica that add one."""
    replica_memory_gib: float = Field(2.5, gt=0)
    """Memory one model replica needs (a full SenseVoice replica with torch and FunASR: about 2.3 GiB): a node
    gets no more CPU replicas than its Ray memory holds."""

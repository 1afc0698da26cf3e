"""What the app builder chooses for the host it sees: how many SenseVoice and Speaker replicas,
their torch threads and CPU reservations, and SenseVoice's precision. Pure: the builder passes the
alive nodes (from `ray.nodes()`) and the settings; the start log, /healthz and `speech-serve host`
show the result with the reason for each choice.

The rules come from the capacity sweeps on a 2-core host (docs/benchmarks.md):
- **On CPU, single-thread model replicas, about one per core the rest leaves.** Two 1-thread
  SenseVoice replicas held twice the devices of one 2-thread replica: a 2-thread replica's
  threads wait on each other whenever the VAD or the Ingress preempts one, while two replicas
  run two batches at once. SenseVoice in dynamic int8 costs half the CPU per utterance of fp32.
- **A replica reserves the cores it is planned to use**, so the autoscaler never stacks another
  model replica on saturated cores; on CPU the counts are fixed per node (an extra replica on a
  full node would load for minutes and add no compute).
- **The Speaker gets its measured share of the model cores** (`sizing.speaker_share`).
- **On a GPU node** the models take GPU fractions (`placement.*.num_gpus`), two CPU threads each
  for the frontend, fp32, and autoscale between one replica per GPU and as many as the fractions fit.
  Not yet measured on a GPU (docs/benchmarks.md says so).

Anything the config states explicitly (`asr.threads`, `asr.quantize`, a placement's `num_cpus`
or `num_replicas`, a deployment's `autoscaling_config` in the YAML) wins over the plan.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from speech_serve.settings import AppSettings

MODEL_DEPLOYMENTS = ("SenseVoice", "Speaker")


@dataclass(frozen=True)
class Node:
    """One Ray node as the builder sees it (ray.nodes()'s Resources)."""

    cpus: float
    gpus: float = 0.0
    memory_gib: float | None = None  # Ray's `memory` resource: what replicas may reserve
    resources: frozenset[str] = frozenset()  # custom resources it offers (placement.*.resources)

    @classmethod
    def from_ray(cls, node: dict) -> Node:
        res = node.get("Resources", {})
        memory = res.get("memory")
        custom = frozenset(k for k in res if k not in ("CPU", "GPU", "memory", "object_store_memory")
                           and not k.startswith("node:") and not k.startswith("accelerator_type"))  # fmt: skip
        return cls(res.get("CPU", 0.0), res.get("GPU", 0.0), memory / 2**30 if memory else None, custom)


@dataclass
class ModelPlan:
    """One model deployment's replicas as planned."""

    threads: int
    num_cpus: float | None  # per replica; None: the placement's explicit value stands
    replicas: int | None  # fixed count (CPU); None: autoscaling between min and max
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: int | None = None  # where it autoscales (GPU)
    device: str = "cpu"

    def autoscaling(self) -> dict[str, Any] | None:
        """The Serve options for the count: fixed on CPU, a range on GPU (None: leave Serve's)."""
        if self.replicas is not None:
            return {"min_replicas": self.replicas, "max_replicas": self.replicas, "initial_replicas": self.replicas}
        if self.min_replicas is not None:
            return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                    "target_ongoing_requests": self.target_ongoing_requests}  # fmt: skip
        return None


@dataclass
class HostPlan:
    node: Node | None  # the node shape the model replicas were sized for (None: none seen)
    model_nodes: int
    asr: ModelPlan
    speaker: ModelPlan | None  # None: the speaker model is off
    quantize: str  # what SenseVoice's replicas do: int8 on CPU, none (fp32) on GPU, or as asked
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.node is not None:
            out["node"]["resources"] = sorted(self.node.resources)
        return out

    def describe(self) -> str:
        return "; ".join(self.reasons)


def light_cpus(settings: AppSettings) -> float:
    """What Ingress and VADHost reserve on a node: the models get the rest."""
    return sum(settings.placement[name].num_cpus or 0.0 for name in ("Ingress", "VADHost"))


def model_nodes(nodes: list[Node], settings: AppSettings) -> list[Node]:
    """The nodes SenseVoice may run on: those offering its placement's custom resources."""
    wanted = set(settings.placement["SenseVoice"].resources)
    return [n for n in nodes if wanted <= n.resources and n.cpus > 0]


def plan_host(nodes: list[Node], settings: AppSettings, gpus: bool) -> HostPlan:
    """The plan for these alive nodes. `gpus`: whether the placement's GPU fractions apply
    (the builder's `use_gpus` decision)."""
    hosts = model_nodes(nodes, settings)
    speaker_on = settings.speaker.enabled
    if gpus:
        return _gpu_plan(hosts, settings, speaker_on)
    if not hosts:
        asr = ModelPlan(threads=settings.asr.threads or 1, num_cpus=None, replicas=None)
        speaker = ModelPlan(threads=settings.speaker.threads or 1, num_cpus=None, replicas=None) if speaker_on else None
        why = "no node offers SenseVoice's placement resources yet: replica counts as configured"
        return HostPlan(None, 0, asr, speaker, _quantize(settings, "cpu"), [why])
    node = max(hosts, key=lambda n: n.cpus)
    same = sum(1 for n in hosts if n.cpus >= node.cpus)
    reasons = [f"{len(hosts)} node(s) for the models, sized for {node.cpus:g} CPUs, no GPU"]
    sz = settings.sizing
    light = light_cpus(settings)
    model_cores = max(node.cpus - light - node.cpus * sz.spare_cores_fraction, 0.1)
    speaker_cores = model_cores * sz.speaker_share if speaker_on else 0.0
    asr_cores = model_cores - speaker_cores
    reasons.append(f"{model_cores:.2f} cores for the models after Ingress+VADHost ({light:g}) and "
                   f"{sz.spare_cores_fraction:.0%} spare" + (f", {sz.speaker_share:.0%} of them to the Speaker"
                                                              if speaker_on else ""))  # fmt: skip
    memory = node.memory_gib
    speaker = None
    if speaker_on:
        speaker = _cpu_model(speaker_cores, settings.speaker.threads, settings.placement["Speaker"], memory,
                             sz.replica_memory_gib, same, "Speaker", reasons)  # fmt: skip
        if memory is not None:
            memory -= (speaker.replicas or 1) / same * sz.replica_memory_gib
    asr = _cpu_model(asr_cores, settings.asr.threads, settings.placement["SenseVoice"], memory,
                     sz.replica_memory_gib, same, "SenseVoice", reasons)  # fmt: skip
    quantize = _quantize(settings, "cpu")
    why = "int8 on CPU: half the CPU per utterance" if settings.asr.quantize == "auto" else "asr.quantize"
    reasons.append(f"SenseVoice precision {quantize} ({why})")
    return HostPlan(node, len(hosts), asr, speaker, quantize, reasons)


def _cpu_model(cores: float, threads: int | None, placement, memory_gib: float | None,
               replica_gib: float, nodes: int, name: str, reasons: list[str]) -> ModelPlan:  # fmt: skip
    """Single-thread replicas, one per core (rounded up: a replica between batches leaves its core to
    the others), each reserving its share; fewer with more threads where the node's memory is short."""
    if placement.num_replicas is not None:
        reasons.append(f"{name}: {placement.num_replicas} replica(s) as placed, {threads or 1} thread(s)")
        return ModelPlan(threads or 1, placement.num_cpus, None)
    per_node = max(1, math.ceil(round(cores / (threads or 1), 2)))
    if memory_gib is not None and memory_gib // replica_gib < per_node:
        fit = max(1, int(memory_gib // replica_gib))
        reasons.append(f"{name}: memory fits {fit} replica(s) of {replica_gib:g} GiB, not {per_node}: fewer, "
                       "with more threads each")  # fmt: skip
        per_node = fit
    threads = threads or max(1, math.floor(round(cores / per_node, 2)))
    num_cpus = placement.num_cpus if placement.num_cpus is not None else round(cores / per_node, 2)
    how = "as placed" if placement.num_cpus is not None else "reserved"
    reasons.append(f"{name}: {per_node} replica(s) per node x {threads} thread(s), {num_cpus:g} CPUs {how} each")
    return ModelPlan(threads, num_cpus, per_node * nodes)


def _gpu_plan(hosts: list[Node], settings: AppSettings, speaker_on: bool) -> HostPlan:
    hosts = [n for n in hosts if n.gpus > 0]
    gpus = sum(n.gpus for n in hosts)
    node = max(hosts, key=lambda n: (n.gpus, n.cpus)) if hosts else None
    reasons = [f"GPUs apply: {gpus:g} GPU(s) on {len(hosts)} node(s) now" if hosts
               else "GPUs apply (use_gpus: always); no GPU node up yet"]  # fmt: skip
    names = ["SenseVoice", "Speaker"] if speaker_on else ["SenseVoice"]
    light = light_cpus(settings)
    room = None if node is None else (node.cpus * (1 - settings.sizing.spare_cores_fraction) - light) / len(names)

    def plan(name: str, threads: int | None) -> ModelPlan:
        threads = threads or settings.sizing.gpu_threads
        placement = settings.placement[name]
        # a CPU per thread, less where one replica of each model would not fit the node
        num_cpus = placement.num_cpus if placement.num_cpus is not None else (
            float(threads) if room is None else round(max(min(threads, room), 0.1), 2))  # fmt: skip
        fraction = placement.num_gpus
        if not gpus or fraction <= 0 or placement.num_replicas is not None:
            reasons.append(f"{name}: {fraction:g} GPU each, replica counts as configured, {threads} CPU thread(s)")
            return ModelPlan(threads, num_cpus, None, device="cuda")
        lo, hi = max(1, int(gpus)), max(1, int(gpus // fraction))
        reasons.append(f"{name}: {fraction:g} GPU each, {lo}-{max(lo, hi)} replicas, {threads} CPU thread(s), "
                       f"{num_cpus:g} CPUs each")  # fmt: skip
        return ModelPlan(threads, num_cpus, None, lo, max(lo, hi), settings.sizing.gpu_target_ongoing_requests,
                         device="cuda")  # fmt: skip

    asr = plan("SenseVoice", settings.asr.threads)
    speaker = plan("Speaker", settings.speaker.threads) if speaker_on else None
    quantize = _quantize(settings, "cuda")
    reasons.append(f"SenseVoice precision {quantize} on GPU")
    return HostPlan(node, len(hosts), asr, speaker, quantize, reasons)


def _quantize(settings: AppSettings, device: str) -> str:
    asked = settings.asr.quantize
    if asked != "auto":
        return asked
    return "int8" if device == "cpu" else "none"  # dynamic int8 kernels are CPU-only

"""What the app builder chooses for this host: model replicas, threads, reservations, precision
(speech_serve/sizing.py), and with --measure the sessions admission by compute would admit.

    speech-serve host                            # this machine, as `serve run` would see it
    speech-serve host config/capacity.yaml --measure
    speech-serve host --address auto             # the nodes of a running Ray cluster

--measure loads SenseVoice as a replica of the plan would (its threads, its precision), times the
warm-up batch a replica times at start, and prints the sessions per replica and for the host that
`compute.sessions_per_asr_replica: measured` derives from it. A running service reports the same
from its own replicas in /healthz (`compute_admission`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from speech_serve.settings import AppSettings, BatchSettings
from speech_serve.sizing import HostPlan, Node, plan_host

# Ray's `memory` resource on a node started without one: about 70% of what is free (its default)
RAY_MEMORY_SHARE = 0.7


def this_machine() -> Node:
    """This machine as a Ray node started here would offer it (approximately)."""
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # no torch or no driver: no GPU
        pass
    return Node(cpus=float(os.cpu_count() or 1), gpus=float(gpus), memory_gib=pages * RAY_MEMORY_SHARE / 2**30)


def cluster_nodes(address: str) -> list[Node]:
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        return [Node.from_ray(n) for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()


def settings_of(config: str | None) -> AppSettings:
    if config is None:
        return AppSettings()
    from speech_serve.cli.profile import load

    return AppSettings(**load(Path(config))["applications"][0]["args"])


def measure(settings: AppSettings, plan: HostPlan) -> dict:
    """Time the warm-up batch as a SenseVoice replica of this plan would, and derive its sessions."""
    import torch

    from speech_serve.ingress.capacity import sessions_for
    from speech_serve.messages import ModelTiming
    from speech_serve.replicas.asr import AsrCore
    from speech_serve.replicas.models import resolve_models

    threads = plan.asr.threads
    torch.set_num_threads(threads)
    device = "cuda" if plan.asr.device == "cuda" and torch.cuda.is_available() else "cpu"
    core = AsrCore(resolve_models(settings.models).asr, settings.asr.model_copy(update={"threads": threads}), device)
    batch = BatchSettings().max_batch_size  # the replicas' default user_config
    single_s, batch_s = core.time_batches(settings.compute.warmup_utterance_s, batch)
    timing = ModelTiming("here", device, threads, plan.asr.num_cpus, settings.compute.warmup_utterance_s, batch,
                         round(single_s, 4), round(batch_s, 4))  # fmt: skip
    per = sessions_for(timing, settings.compute, settings.vad.max_end_silence_ms / 1000)
    replicas = plan.asr.replicas or 1
    return {"precision": core.precision, "single_s": timing.single_s, "batch_s": timing.batch_s,
            "sessions_per_replica": per.sessions, "why": per.why, "replicas": replicas,
            "sessions": per.sessions * replicas}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="speech-serve host", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("config", nargs="?", help="a config or profile (default: the code's defaults)")
    p.add_argument("--address", help="a running Ray cluster's address (auto: the local one); default: this machine")
    p.add_argument("--gpus", choices=["auto", "always", "never"], help="as use_gpus (default: the config's)")
    p.add_argument("--measure", action="store_true", help="time SenseVoice's warm-up batch here and derive the cap")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    settings = settings_of(a.config)
    nodes = cluster_nodes(a.address) if a.address else [this_machine()]
    use = a.gpus or settings.use_gpus
    gpus = any(n.gpus for n in nodes) if use == "auto" else use == "always"
    plan = plan_host(nodes, settings, gpus)
    out = {"nodes": [{"cpus": n.cpus, "gpus": n.gpus, "memory_gib": round(n.memory_gib or 0, 1)} for n in nodes],
           "plan": plan.as_dict()}  # fmt: skip
    if a.measure:
        with contextlib.redirect_stdout(sys.stderr):  # funasr prints its version on import: keep --json parseable
            out["measured"] = measure(settings, plan)
    if a.json:
        print(json.dumps(out, indent=2))
        return
    for reason in plan.reasons:
        print(f"- {reason}")
    if a.measure:
        m = out["measured"]
        print(f"- warm-up ({m['precision']}): {m['why']}")
        print(f"- admission by compute: {m['sessions_per_replica']} sessions per SenseVoice replica, "
              f"{m['sessions']} for {m['replicas']} replica(s)")  # fmt: skip


if __name__ == "__main__":
    main()

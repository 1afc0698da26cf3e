"""A fleet's capacity plan from a capacity sweep: how many nodes like the sweep's (and how many
GPUs) hold N devices at a latency target, and the overlay that deploys them.

    speech-serve plan --devices 500 --p95 1.5 --from loadtest/results/sweep-default
    speech-serve plan --devices 500 --p95 1.5 --from DIR --out config/fleet.yaml
    speech-serve plan --devices 500 --p95 1.5 --from DIR --kuberay --out deploy/kuberay/fleet.yaml

The sweep (`speech-serve sweep`) writes `capacity.json` beside its report: the node it ran on and,
per level, the devices each node running SenseVoice held with nothing lost at that level's p95.
A node holds, at target X, the most devices of any level whose p95 was <= X (no interpolation:
levels between those measured are not known). The plan rounds the nodes up and adds `--spare`
nodes so that losing one keeps the fleet within its target. The overlay (`--out`) is one of
config/multi-node.yaml (Ray nodes you start) or, with `--kuberay`, of deploy/kuberay/overlay.yaml
(`speech-serve kuberay --overlay FILE` then sizes the worker groups from its replica counts); it pins the replica counts
that the builder would otherwise size from the nodes up at start, which an autoscaled fleet does
not have yet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from speech_serve.settings import AppSettings

CAPACITY_FILE = "capacity.json"
TARGETS_S = (1.0, 1.5, 2.0, 2.5, 3.0)  # the p95 targets the sweep reports devices per node at
ROOT = Path(__file__).parents[2]
BASES = {False: ROOT / "config" / "multi-node.yaml", True: ROOT / "deploy" / "kuberay" / "overlay.yaml"}
SERVE_YAML = ROOT / "config" / "serve.yaml"


def ingress_sessions(config: Path = SERVE_YAML) -> int:
    """Sessions per Ingress replica: the Ingress's target_ongoing_requests in config/serve.yaml."""
    app = yaml.safe_load(config.read_text())["applications"][0]
    ingress = next(d for d in app["deployments"] if d["name"] == "Ingress")
    return int(ingress["autoscaling_config"]["target_ongoing_requests"])


def per_node_at(levels: list[dict], target_s: float) -> dict | None:
    """The level whose nodes held the most devices each with nothing lost and p95 <= target."""
    ok = [lv for lv in levels if lv["lost"] == 0 and lv["admitted"] > 0 and lv["p95_s"] is not None
          and lv["p95_s"] <= target_s]  # fmt: skip
    return max(ok, key=lambda lv: lv["per_node"], default=None)


def node_capacity(levels: list, node: dict, workload: dict) -> dict:
    """What `capacity.json` holds, from a sweep's levels (sweep.Level) and the node they ran on."""
    rows = [{"offered": lv.offered, "admitted": lv.admitted, "refused": lv.refused, "lost": lv.lost,
             "p95_s": lv.p95_s, "asr_nodes": lv.asr_nodes or 1,
             "per_node": lv.per_asr_node if lv.per_asr_node is not None else float(lv.admitted)}
            for lv in levels]  # fmt: skip
    held = {}
    for target in TARGETS_S:
        best = per_node_at(rows, target)
        held[f"{target:g}"] = best["per_node"] if best else 0
    return {"node": node, "workload": workload, "levels": rows, "devices_per_node_at_p95": held}


def held_line(capacity: dict) -> str:
    held = capacity["devices_per_node_at_p95"]
    return "- **devices per node at p95 <=** " + ", ".join(f"{t} s: {n:g}" for t, n in held.items()) + (
        f" (a node of {capacity['node'].get('cpus', '?'):g} CPUs, {capacity['node'].get('gpus', 0):g} GPUs; "
        "`speech-serve plan --from` this folder sizes a fleet)")  # fmt: skip


@dataclass
class FleetPlan:
    devices: int
    target_s: float
    per_node: float  # devices one node holds at the target
    from_level: int  # the sweep level that showed it
    nodes: int  # model nodes, spares included
    spare: int
    gpus: float  # GPUs in all (nodes x the sweep node's)
    replicas: dict[str, int]  # deployment -> replicas to pin
    max_sessions: int  # what the fleet admits (admission.max_sessions_total)


def plan_fleet(capacity: dict, devices: int, target_s: float, spare: int = 0) -> FleetPlan:
    best = per_node_at(capacity["levels"], target_s)
    if best is None:
        measured = ", ".join(f"{lv['p95_s']}" for lv in capacity["levels"])
        raise SystemExit(f"no level of this sweep held its devices at p95 <= {target_s:g} s with nothing lost "
                         f"(p95s measured: {measured}); sweep fewer devices per node or plan for a laxer "
                         "target")  # fmt: skip
    per_node = best["per_node"]
    nodes = math.ceil(devices / per_node) + spare
    node = capacity["node"]
    per_node_replicas = node.get("replicas", {})
    vad_sessions = AppSettings().vad.sessions_per_replica
    replicas = {
        "SenseVoice": nodes * per_node_replicas.get("SenseVoice", 1),
        "Ingress": max(2, math.ceil(devices / ingress_sessions())),  # two: a lost one leaves devices a place to go
        "VADHost": max(2, math.ceil(devices / vad_sessions)),
    }
    if per_node_replicas.get("Speaker") and capacity["workload"].get("speaker"):
        replicas["Speaker"] = nodes * per_node_replicas["Speaker"]
    return FleetPlan(devices, target_s, per_node, best["offered"], nodes, spare, nodes * node.get("gpus", 0),
                     replicas, math.floor(per_node * (nodes - spare)))  # fmt: skip


def overlay(plan: FleetPlan, out: Path, kuberay: bool) -> dict:
    base = Path(os.path.relpath(BASES[kuberay], out.resolve().parent))
    deployments = [{"name": name, "autoscaling_config": {"min_replicas": n, "max_replicas": n}}
                   for name, n in plan.replicas.items()]  # fmt: skip
    return {
        "base": str(base),
        "applications": [{
            "name": "speech",
            "args": {"admission": {"max_sessions_total": plan.max_sessions}},
            "deployments": deployments,
        }],
    }  # fmt: skip


def describe(plan: FleetPlan, capacity: dict, source: str) -> str:
    node = capacity["node"]
    gpus = f", {plan.gpus:g} GPUs in all" if plan.gpus else ""
    lines = [
        f"{plan.devices} devices at p95 <= {plan.target_s:g} s: {plan.nodes} node(s) like the sweep's "
        f"({node.get('cpus', '?'):g} CPUs, {node.get('gpus', 0):g} GPUs){gpus}",
        f"- one node held {plan.per_node:g} devices at p95 <= {plan.target_s:g} s with nothing lost "
        f"(the {plan.from_level}-device level of {source})",
        f"- {math.ceil(plan.devices / plan.per_node)} for the devices"
        + (f" + {plan.spare} spare" if plan.spare else "")
        + f"; the fleet admits {plan.max_sessions} (admission.max_sessions_total), more get 1013",
        "- replicas to pin: " + ", ".join(f"{k} {v}" for k, v in plan.replicas.items()),
    ]  # fmt: skip
    return "\n".join(lines)


def load_capacity(folder: Path) -> dict:
    path = folder / CAPACITY_FILE
    if not path.exists():
        raise SystemExit(f"{path} not found: run `speech-serve sweep --out {folder}` first (it writes {CAPACITY_FILE})")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="speech-serve plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--devices", type=int, required=True, help="devices in the fleet")
    p.add_argument("--p95", type=float, required=True, help="latency target, end of speech to result, seconds")
    p.add_argument("--from", dest="source", required=True, help="a capacity sweep's folder (its capacity.json)")
    p.add_argument("--spare", type=int, default=0, help="extra nodes, so that losing that many keeps the target")
    p.add_argument("--kuberay", action="store_true", help="an overlay of deploy/kuberay/overlay.yaml")
    p.add_argument("--out", help="write the overlay here")
    a = p.parse_args(argv)
    capacity = load_capacity(Path(a.source))
    plan = plan_fleet(capacity, a.devices, a.p95, a.spare)
    print(describe(plan, capacity, a.source))
    if a.kuberay and not capacity["node"].get("gpus"):
        print("- note: this sweep ran on a node without GPUs, while deploy/kuberay/overlay.yaml puts the models on GPU "
              "pods: give cluster.yaml a CPU model group like the sweep's node, or sweep a GPU node")  # fmt: skip
    if a.out:
        out = Path(a.out)
        body = overlay(plan, out, a.kuberay)
        head = (f"# speech-serve plan --devices {a.devices} --p95 {a.p95:g} --from {a.source}"
                + (f" --spare {a.spare}" if a.spare else "") + (" --kuberay" if a.kuberay else "")
                + f"\n# {plan.nodes} node(s) of {plan.per_node:g} devices each at p95 <= {a.p95:g} s\n")  # fmt: skip
        out.write_text(head + yaml.safe_dump(body, sort_keys=False))
        then = (f"speech-serve kuberay --overlay {out}" if a.kuberay
                else f"speech-serve profile {out} -o merged.yaml; serve deploy merged.yaml")  # fmt: skip
        print(f"- wrote {out} (then: {then})")


if __name__ == "__main__":
    main()

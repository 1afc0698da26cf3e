"""Capacity sweep: how many devices one service holds at the latency target, next to the compute
bound measured in the same run on the same host.

    speech-serve sweep                                                      # against a running service (make serve)
    speech-serve sweep --levels 1,2,4,8 --protocol xiaozhi --target-p95 3 \
        --out loadtest/reports/sweep

For each level (devices offered at once) it runs the load tool (`loadgen.py`) long enough for
`--utterances` utterances per device, then waits until the service is quiet again (no live
session, its CPU back to idle) before the next level. Per level: end-of-speech-to-result p50/p95,
utterances lost (no result, or one later than `--lost-after` seconds), devices refused at connect,
and server CPU by process (cores, and cores per admitted device).

The compute bound: bare batched SenseVoice `generate` on the corpus clips in this process (the
same model size as the service's test models, or `--asr-model DIR`), measured while the service
is idle: speech-seconds transcribed per second, divided by the speech each device produces per
second (the workload's speech share). "Held" is the most admitted devices of a level with p95 <=
the target and nothing lost; the report prints held / bound.

On a cluster (`--dashboard`, the Ray dashboard's address; the service's own by default) it also
records, at the end of each level, the alive nodes and the Serve replicas on each, and reports
devices per node: admitted devices over the nodes that ran SenseVoice replicas at that level (the
compute), which is the figure to size a cluster with. The compute bound is this host's: run the
sweep on a machine like the model nodes. Server CPU by process is read from /proc: this host only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx

from speech_serve.cli.dashboard import auth_headers
from speech_serve.cli.plan import CAPACITY_FILE, held_line, node_capacity
from speech_serve.loadtest.loadgen import cpu_by_kind, cpu_seconds, run_load
from speech_serve.loadtest.records import Clip, LoadConfig, load_corpus
from speech_serve.loadtest.report import pct

SERVER_KINDS_EXCLUDED = {"loadgen"}  # CPU not spent by the service
TRANSPORT_KINDS = ("proxy", "Ingress", "VADHost")  # what carries frames and finds utterance ends
STATE_API_LIMIT = 10_000  # the most records Ray's state API answers by default


@dataclass
class SweepConfig:
    url: str = "ws://127.0.0.1:8000"
    protocol: str = "funasr"
    funasr_mode: str = "offline"  # one result per utterance, as the compute bound counts; 2pass adds interims
    levels: list[int] = field(default_factory=lambda: [1, 2, 4, 6, 8, 12, 16])
    utterances: int = 8  # per device and level
    pause_s: tuple[float, float] = (1.2, 2.0)  # silence between utterances (> the VAD's end silence)
    target_p95_s: float = 3.0
    lost_after_s: float = 10.0  # a result later than this counts as lost
    corpus: str = "loadtest/corpus"
    seed: int = 1
    together: bool = False  # every device streams the same clips and pauses from the same moment
    auth_secret: str | None = None
    out: str = "loadtest/reports/sweep"
    quiet_margin_cores: float = 0.15  # the service counts as drained within this of its idle CPU use ...
    drain_timeout_s: float = 180.0  # ... or after this long (then the report says so)
    bound: bool = True
    bound_size: str = "full"  # test-model size for the bound (the service's models.test_model_size)
    asr_model: str | None = None  # a local SenseVoice directory instead (real weights)
    bound_threads: int = 2
    bound_quantize: str = "auto"  # as the service's asr.quantize; auto: read from its /healthz
    bound_engine: str = "auto"  # as the service's asr.quantized_engine; auto: read from its /healthz
    bound_batch: int = 8
    dashboard: str | None = "http://127.0.0.1:8265"  # Ray dashboard: nodes and replicas per node (None: skip)


@dataclass
class Level:
    offered: int
    admitted: int
    refused: int
    utterances: int
    lost: int  # no result, or later than lost_after_s
    p50_s: float | None
    p95_s: float | None
    wall_s: float
    cores: dict[str, float]  # by process kind, averaged over the level
    connection_errors: int
    error_frames: int
    drained: bool  # the service was quiet before this level started
    nodes: list[dict] | None = None  # at the level's end: alive nodes and the Serve replicas on each
    bound_before: float | None = None  # the compute bound's burst just before this level (speech-s/s)
    stages: dict[str, list[float]] | None = None  # stage -> [p50, p95] ms: where the latency went
    load_tool_cores: float | None = None  # this sweep's own devices, on the same host
    host_busy_cores: float | None = None  # every process on this host (from /proc/stat)
    speaker_ran: int | None = None  # answered utterances whose result says the speaker model ran

    @property
    def asr_nodes(self) -> int | None:
        """Nodes that ran SenseVoice replicas at the end of the level (None: not known)."""
        if self.nodes is None:
            return None
        return sum(1 for n in self.nodes if n["replicas"].get("SenseVoice"))

    @property
    def per_asr_node(self) -> float | None:
        """Admitted devices per node running SenseVoice."""
        return round(self.admitted / self.asr_nodes, 1) if self.asr_nodes else None

    @property
    def held(self) -> bool:
        return self.lost == 0 and self.admitted > 0 and self.p95_s is not None

    def ceiling(self, cpus: int) -> float | None:
        """The most devices SenseVoice could serve on this host with every core the rest of the
        host's work left it at this level (the rest of the service, the load tool, Ray, the OS), at
        the cores per device it used here: where held / bound stops on shared cores, however the
        service batches or queues. An upper estimate, reached only with every core busy; the rest
        grows with devices too."""
        asr = self.cores.get("SenseVoice", 0.0)
        if not self.admitted or self.host_busy_cores is None or asr <= 0:
            return None
        return round(self.admitted * self.cores_left_for_asr(cpus) / asr, 1)

    def cores_left_for_asr(self, cpus: int) -> float:
        """The cores everything but SenseVoice left free at this level (host_busy_cores known)."""
        return cpus - (self.host_busy_cores - self.cores.get("SenseVoice", 0.0))

    def cores_per_device(self, kinds: tuple[str, ...], idle: dict[str, float] | None = None) -> float | None:
        """Cores of `kinds` per admitted device, above what they use idle."""
        if not self.admitted:
            return None
        used = sum(self.cores.get(k, 0.0) - (idle or {}).get(k, 0.0) for k in kinds)
        return round(used / self.admitted, 3)


def node_layout(nodes: list, actors: list, app: str | None = None) -> list[dict]:
    """Each alive node (its IP, head or not, CPUs, GPUs) with the Serve replicas on it, by
    deployment, from Ray's state API records. Replica actors are named
    `SERVE_REPLICA::<app>#<deployment>#<id>`."""
    replicas: dict[str, Counter] = {}
    for actor in actors:
        name = actor.name or ""
        if actor.state != "ALIVE" or not name.startswith("SERVE_REPLICA::"):
            continue
        app_name, _, rest = name.removeprefix("SERVE_REPLICA::").partition("#")
        if app is None or app_name == app:
            replicas.setdefault(actor.node_id, Counter())[rest.partition("#")[0]] += 1
    return [
        {"node_id": n.node_id[:8], "ip": n.node_ip, "head": bool(n.is_head_node),
         "cpus": n.resources_total.get("CPU", 0.0), "gpus": n.resources_total.get("GPU", 0.0),
         "replicas": dict(sorted(replicas.get(n.node_id, Counter()).items()))}
        for n in sorted(nodes, key=lambda n: (not n.is_head_node, n.node_ip))
        if n.state == "ALIVE"
    ]  # fmt: skip


def cluster_nodes(dashboard: str | None) -> list[dict] | None:
    """node_layout of the cluster behind the Ray dashboard at `dashboard`, from its state API over
    HTTP with the cluster's token (speech_serve.cli.dashboard). None when it cannot be read: the report then
    has no per-node figures."""
    if not dashboard:
        return None

    def records(kind: str, **params) -> list[SimpleNamespace]:
        r = httpx.get(f"{dashboard.rstrip('/')}/api/v0/{kind}", params={"limit": STATE_API_LIMIT, **params},
                      headers=auth_headers(), timeout=10)  # fmt: skip
        r.raise_for_status()
        return [SimpleNamespace(**item) for item in r.json()["data"]["result"]["result"]]

    try:
        nodes = records("nodes")
        actors = records("actors", filter_keys="state", filter_predicates="=", filter_values="ALIVE")
    except Exception as exc:  # no dashboard there, no token, an older Ray: the sweep goes on without
        print(f"no node layout from {dashboard}: {type(exc).__name__}: {exc}", flush=True)
        return None
    return node_layout(nodes, actors)


def service_cores(seconds: float) -> dict[str, float]:
    """CPU cores used by each Serve process kind over `seconds` (this process excluded)."""
    before = cpu_seconds()
    time.sleep(seconds)
    used = cpu_by_kind(before, cpu_seconds())
    return {k: round(v / seconds, 3) for k, v in used.items() if k not in SERVER_KINDS_EXCLUDED}


def host_busy_seconds() -> float | None:
    """CPU seconds this host has been busy (every CPU, every process: /proc/stat's user, nice,
    system, irq, softirq and steal), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def host_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def live_sessions(url: str) -> int | None:
    base = url.replace("ws://", "http://").replace("wss://", "https://").rstrip("/")
    try:
        return int(httpx.get(f"{base}/healthz", timeout=10).json()["live_sessions_this_replica"])
    except Exception:
        return None


def wait_quiet(cfg: SweepConfig, idle_cores: float | None) -> bool:
    """Until no session is live and the service's CPU is back within `quiet_margin_cores` of idle
    (without an idle figure yet: until no session is live)."""
    deadline = time.monotonic() + cfg.drain_timeout_s
    while time.monotonic() < deadline:
        if live_sessions(cfg.url):
            time.sleep(1.0)
            continue
        if idle_cores is None or sum(service_cores(2.0).values()) < idle_cores + cfg.quiet_margin_cores:
            return True
    return False


def speech_share(clips: list[Clip], pause_s: tuple[float, float]) -> float:
    speech = statistics.mean(c.seconds for c in clips)
    return speech / (speech + sum(pause_s) / 2)


def service_asr_precision(cfg: SweepConfig) -> tuple[str, str]:
    """The running service's asr.quantize and asr.quantized_engine, as its /healthz reports the
    SenseVoice source ("... [int8 on CPU, onednn kernels]")."""
    base = cfg.url.replace("ws://", "http://").replace("wss://", "https://").rstrip("/")
    asr = httpx.get(f"{base}/healthz", timeout=10).json().get("model_sources", {}).get("asr", "")
    return parse_asr_precision(asr)


def parse_asr_precision(described: str) -> tuple[str, str]:
    found = re.search(r"\[int8 on CPU(?:, (\w+) kernels)?\]", described)
    engine = found.group(1) if found and found.group(1) else "x86"  # a service that names none runs torch's default
    return ("int8" if found else "none"), engine


def _bound_worker(conn, cfg: SweepConfig, quantize: str, engine: str, inputs: list) -> None:
    """The bound's own process: loads the model once, then runs one burst per request."""
    from speech_serve.replicas.models import ModelSource, load_automodel, materialize, prepare_asr, resolve_models
    from speech_serve.settings import ModelSettings

    if cfg.asr_model:
        source = ModelSource("asr", "local", cfg.asr_model)
    else:
        source = resolve_models(ModelSettings(test_model_size=cfg.bound_size), hub_up=False).asr
        materialize(source)
    model = load_automodel(source, device="cpu", threads=cfg.bound_threads, frontend_conf={"dither": 0.0})
    # traced whatever the service does: the fastest way this host runs the model, and it changes no result
    precision = prepare_asr(model, "cpu", quantize, engine, trace=True)
    model.generate(input=inputs[: cfg.bound_batch], batch_size=cfg.bound_batch, language="auto")  # warm up
    conn.send((precision, source.describe()))
    batch_size = cfg.bound_batch
    while conn.recv() == "burst":
        rates = []
        for start in range(0, len(inputs) - batch_size + 1, batch_size):
            batch = inputs[start : start + batch_size]
            started = time.perf_counter()
            model.generate(input=batch, batch_size=len(batch), language="auto", use_itn=True)
            rates.append(sum(len(x) for x in batch) / 16000 / (time.perf_counter() - started))
        conn.send(rates)


class BoundMeter:
    """Bare batched SenseVoice throughput on this host, in speech-seconds per second.

    Measured in bursts while the service is idle: one before every level. This host's speed drifts
    by tens of percent within minutes (three single measurements of the same command gave 15.9, 17.8
    and 28.1 speech-s/s), so a bound taken once says little about the levels long after it; the
    report uses the median of every batch of every burst and shows their range. The model lives in
    a process of its own, loaded once, so the load generator's process holds no model while a level
    runs (the one sweep run with the model in-process lost 12 of 133 utterances at 16 devices; not
    isolated from this host's noise)."""

    def __init__(self, cfg: SweepConfig, clips: list[Clip]):
        import multiprocessing

        from speech_serve.messages import to_float32

        self.cfg = cfg
        quantize, engine = cfg.bound_quantize, cfg.bound_engine
        if quantize == "auto" or (quantize != "none" and engine == "auto"):  # fp32 has no int8 kernels to ask for
            served_quantize, served_engine = service_asr_precision(cfg)
            quantize = served_quantize if quantize == "auto" else quantize
            engine = served_engine if engine == "auto" else engine
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        inputs = [to_float32(c.pcm) for c in clips]
        self._process = ctx.Process(target=_bound_worker, args=(child, cfg, quantize, engine, inputs), daemon=True)
        self._process.start()
        self.precision, self.model_described = self._conn.recv()
        self.bursts: list[list[float]] = []

    def measure(self) -> float:
        """One burst: every whole batch of the corpus once; returns its median rate."""
        self._conn.send("burst")
        rates = self._conn.recv()
        self.bursts.append([round(r, 2) for r in rates])
        return round(statistics.median(rates), 2)

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send("stop")
            self._process.join(30)

    def result(self) -> dict:
        every = [r for burst in self.bursts for r in burst]
        return {"speech_s_per_s": round(statistics.median(every), 2), "min": min(every), "max": max(every),
                "bursts": self.bursts, "threads": self.cfg.bound_threads, "batch": self.cfg.bound_batch,
                "precision": self.precision, "model": self.model_described}  # fmt: skip


def run_level(
    cfg: SweepConfig, offered: int, clips: list[Clip], out: Path, idle_cores: float, meter: BoundMeter | None = None
) -> tuple[Level, dict]:
    drained = wait_quiet(cfg, idle_cores)
    bound = meter.measure() if meter else None  # the service is idle now
    per_utterance_s = statistics.mean(c.seconds for c in clips) + sum(cfg.pause_s) / 2
    load = LoadConfig(
        url=cfg.url, protocol=cfg.protocol, funasr_mode=cfg.funasr_mode, clients=offered, ramp_step=offered,
        ramp_every_s=0,
        duration_s=cfg.utterances * per_utterance_s, pause_s=cfg.pause_s, corpus=cfg.corpus, seed=cfg.seed,
        together=cfg.together, grace_s=cfg.lost_after_s + 5, auth_secret=cfg.auth_secret,
        serve_api="http://127.0.0.1:1", out=str(out / f"level-{offered}"), progress_every_s=10,
    )  # fmt: skip
    started, busy_before = time.monotonic(), host_busy_seconds()
    state = asyncio.run(run_load(load))
    wall = time.monotonic() - started
    busy_after = host_busy_seconds()
    busy = None if busy_before is None or busy_after is None else round((busy_after - busy_before) / wall, 3)
    nodes = cluster_nodes(cfg.dashboard)  # before the drain: the replicas this load scaled to
    records = state.records
    answered = [r for r in records if r.latency_s is not None and r.latency_s <= cfg.lost_after_s]  # on time
    every = [r.latency_s for r in records if r.latency_s is not None]
    level = Level(
        offered=offered, admitted=state.connected - len(state.refused), refused=len(state.refused),
        utterances=len(records), lost=len(records) - len(answered), p50_s=pct(every, 50), p95_s=pct(every, 95),
        wall_s=round(wall, 1),
        cores={k: round(v / wall, 3) for k, v in state.cpu_seconds.items() if k not in SERVER_KINDS_EXCLUDED},
        connection_errors=len(state.connection_errors), error_frames=len(state.unexpected), drained=drained,
        nodes=nodes, bound_before=bound, stages=stage_breakdown(records),
        load_tool_cores=round(state.cpu_seconds["loadgen"] / wall, 3) if "loadgen" in state.cpu_seconds else None,
        host_busy_cores=busy, speaker_ran=sum(1 for r in answered if "speaker_model_ms" in (r.stages_ms or {})),
    )  # fmt: skip
    raw = {"level": asdict(level), "connection_errors": state.connection_errors[:20],
           "error_frames": state.unexpected[:20], "latencies_s": every}  # fmt: skip
    return level, raw


# Where an utterance's latency went, in the order a result goes through it: each stage in ms from
# the record's measured latency and the server's latency_ms stages (st).
STAGES = {
    # audio time from the VAD's segment end to the chunk that closed it (end silence, chunking)
    "endpoint": lambda latency_ms, st: st.get("endpoint_ms", 0.0),
    # round trip of the VADHost call that found the end
    "vad call": lambda latency_ms, st: st.get("vad_ms", 0.0),
    # waiting for a SenseVoice batch (and the hop)
    "asr queue": lambda latency_ms, st: st.get("asr_ms", 0.0) - st.get("asr_model_ms", 0.0),
    "asr model": lambda latency_ms, st: st.get("asr_model_ms", 0.0),
    # fsmn-vad puts a segment's end ~150-210 ms after the last speech sample (so "endpoint" leaves
    # that out: it lands here), frames in transit and queued before the VAD, the result's way back
    "rest": lambda latency_ms, st: latency_ms - st.get("endpoint_ms", 0.0) - st.get("server_ms", 0.0),
}


def stage_breakdown(records: list) -> dict[str, list[float]]:
    """p50 and p95 (ms) of each stage over the answered utterances that carry the server's stages."""
    rows = [r for r in records if r.latency_s is not None and r.stages_ms]
    if not rows:
        return {}
    out = {}
    for name, stage in STAGES.items():
        values = [stage(r.latency_s * 1000, r.stages_ms) for r in rows]
        out[name] = [round(pct(values, 50)), round(pct(values, 95))]
    return out


def held_devices(levels: list[Level], target_p95_s: float) -> int:
    return max((lv.admitted for lv in levels if lv.held and lv.p95_s <= target_p95_s), default=0)


def held_level(levels: list[Level], target_p95_s: float) -> Level | None:
    """The level whose admitted devices are the held figure."""
    held = [lv for lv in levels if lv.held and lv.p95_s <= target_p95_s]
    return max(held, key=lambda lv: lv.admitted, default=None)


def plot(out: Path, levels: list[Level], cfg: SweepConfig, bound_devices: float | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [lv.offered for lv in levels]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [lv.p50_s for lv in levels], marker="o", label="p50")
    ax.plot(x, [lv.p95_s for lv in levels], marker="o", label="p95")
    ax.axhline(cfg.target_p95_s, color="grey", linestyle="--", linewidth=1, label=f"target p95 {cfg.target_p95_s:g} s")
    if bound_devices:
        ax.axvline(bound_devices, color="green", linestyle=":", label=f"compute bound {bound_devices:.1f}")
    ax.set(xlabel="devices offered", ylabel="end of speech to result (s)", title="Capacity: latency and loss")
    ax2 = ax.twinx()
    ax2.bar(x, [100 * lv.lost / lv.utterances if lv.utterances else 0 for lv in levels], alpha=0.25, color="red",
            width=0.6, label="lost %")  # fmt: skip
    ax2.set_ylabel("utterances lost (%)")
    ax2.set_ylim(0, 100)
    lines, labels = ax.get_legend_handles_labels()
    lines2, labels2 = ax2.get_legend_handles_labels()
    ax.legend(lines + lines2, labels + labels2, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "capacity.png", dpi=110)
    plt.close(fig)
    return "capacity.png"


def render(cfg: SweepConfig, levels: list[Level], idle: dict[str, float], bound: dict | None, share: float,
           capacity: dict | None = None) -> str:  # fmt: skip
    bound_devices = bound["speech_s_per_s"] / share if bound else None
    held = held_devices(levels, cfg.target_p95_s)
    kinds = sorted(({k for lv in levels for k in lv.cores} | set(idle)) - {"SenseVoice"})
    mode = f" ({cfg.funasr_mode} mode)" if cfg.protocol == "funasr" else ""
    lines = [
        f"# Capacity sweep: {cfg.protocol} devices{mode}, {cfg.utterances} utterances each per level",
        "",
        f"- workload: corpus `{cfg.corpus}`, pauses {cfg.pause_s[0]:g}-{cfg.pause_s[1]:g} s, speech share "
        f"{share:.0%}{'; devices start together and stream the same recording' if cfg.together else ''}; "
        f"lost = no result within {cfg.lost_after_s:g} s of the end of speech",
        f"- idle service CPU (cores): {idle} (total {sum(idle.values()):.3f})",
    ]
    if bound:
        how = (f"median of {sum(map(len, bound['bursts']))} batches measured before the levels, batches "
               f"{bound['min']}-{bound['max']}; ") if "bursts" in bound else ""
        lines.append(f"- compute bound: bare batched SenseVoice {bound['speech_s_per_s']} speech-s/s "
                     f"({how}batch {bound['batch']}, {bound['threads']} threads, {bound.get('precision', 'fp32')}, "
                     f"{bound['model']}) / {share:.2f} "
                     f"= **{bound_devices:.1f} devices**")  # fmt: skip
    lines.append(
        f"- **devices held at p95 <= {cfg.target_p95_s:g} s with nothing lost: {held}**"
        + (f"; held / bound = **{held / bound_devices:.2f}**" if bound_devices else "")
    )
    at = held_level(levels, cfg.target_p95_s)
    if at is not None and at.per_asr_node is not None:
        lines.append(f"- **devices held per SenseVoice node: {at.per_asr_node}** ({at.admitted} devices, "
                     f"{at.asr_nodes} of {len(at.nodes)} nodes running SenseVoice at that level)")  # fmt: skip
    if capacity is not None:
        lines.append(held_line(capacity))
    if at is not None and at.host_busy_cores is not None:
        lines.append(host_share_line(at))
        lines.append(ceiling_line(at, bound_devices))
    speaker = any(lv.speaker_ran for lv in levels)
    lines += [
        "",
        "| offered | admitted | refused | utterances | lost | p50 s | p95 s | transport+VAD cores/device above idle "
        "| SenseVoice cores | " + " | ".join(f"{k} cores" for k in kinds) + " | load tool cores "
        f"| host busy cores (of {host_cpus()}) | " + ("speaker model ran | " if speaker else "") + "nodes (SenseVoice) "
        "| admitted per SenseVoice node | drained before | bound just before (devices) |",
        "|---" * (15 + speaker + len(kinds)) + "|",
    ]
    for lv in levels:
        nodes = "?" if lv.nodes is None else f"{len(lv.nodes)} ({lv.asr_nodes})"
        lines.append(
            f"| {lv.offered} | {lv.admitted} | {lv.refused} | {lv.utterances} | {lv.lost} | {lv.p50_s} | {lv.p95_s} "
            f"| {lv.cores_per_device(TRANSPORT_KINDS, idle)} | {lv.cores.get('SenseVoice', 0.0)} | "
            + " | ".join(str(lv.cores.get(k, 0.0)) for k in kinds)
            + f" | {_figure(lv.load_tool_cores)} | {_figure(lv.host_busy_cores)} | "
            + (f"{lv.speaker_ran or 0} of {lv.utterances - lv.lost} | " if speaker else "")
            + f"{nodes} | {_figure(lv.per_asr_node)} | {'yes' if lv.drained else 'NO'} "
            f"| {'' if lv.bound_before is None else round(lv.bound_before / share, 1)} |"
        )  # fmt: skip
    if any(lv.stages for lv in levels):
        lines += ["", "Where the time went (ms, p50 / p95 of each stage; the stages' p95s do not add up to the "
                  "latency's):", "", "| offered | " + " | ".join(STAGES) + " |", "|---" * (1 + len(STAGES)) + "|"]
        for lv in levels:
            if lv.stages:
                lines.append(f"| {lv.offered} | " + " | ".join(
                    f"{lv.stages[n][0]} / {lv.stages[n][1]}" for n in STAGES) + " |")  # fmt: skip
    last = next((lv for lv in reversed(levels) if lv.nodes), None)
    if last is not None:
        lines += ["", f"Nodes at the end of the last level ({last.offered} offered; the CPU above is this host's):", "",
                  "| node | IP | head | CPUs | GPUs | Serve replicas |", "|---|---|---|---|---|---|"]  # fmt: skip
        for n in last.nodes:
            replicas = ", ".join(f"{d} {k}" for d, k in n["replicas"].items()) or "none"
            lines.append(f"| {n['node_id']} | {n['ip']} | {'yes' if n['head'] else ''} | {n['cpus']:g} "
                         f"| {n['gpus']:g} | {replicas} |")  # fmt: skip
    lines += ["", "![capacity](capacity.png)", ""]
    return "\n".join(lines)


def model_node(levels: list[Level]) -> dict:
    """The node the models ran on (the first running SenseVoice at the last level the dashboard
    answered for), with its model replicas; this host where the dashboard was not asked."""
    last = next((lv for lv in reversed(levels) if lv.nodes), None)
    for n in last.nodes if last else []:
        if n["replicas"].get("SenseVoice"):
            replicas = {k: v for k, v in n["replicas"].items() if k in ("SenseVoice", "Speaker")}
            return {"cpus": n["cpus"], "gpus": n["gpus"], "replicas": replicas}
    return {"cpus": float(host_cpus()), "gpus": 0.0, "replicas": {}}


def _figure(value: float | None) -> str:
    return "?" if value is None else str(value)


def host_share_line(lv: Level) -> str:
    """Where this host's CPU went at a level: the share SenseVoice had of it, next to what else ran
    on the same cores (held / bound compares with a bound that has every core to itself)."""
    service = sum(lv.cores.values())
    asr = lv.cores.get("SenseVoice", 0.0)
    tool = lv.load_tool_cores or 0.0
    other = max(0.0, lv.host_busy_cores - service - tool)
    return (f"- at that level this host was busy {lv.host_busy_cores:.2f} of {host_cpus()} cores: SenseVoice "
            f"{asr:.2f}, the rest of the service {service - asr:.2f}, the load tool {tool:.2f}, everything else "
            f"(Ray, the OS) {other:.2f}")  # fmt: skip


def ceiling_line(lv: Level, bound_devices: float | None) -> str:
    cpus = host_cpus()
    ceiling = lv.ceiling(cpus)
    if ceiling is None:
        return "- SenseVoice's ceiling on these cores: not known (it used no CPU at that level)"
    left = lv.cores_left_for_asr(cpus)
    ratio = f" = {ceiling / bound_devices:.2f} of the bound" if bound_devices else ""
    return (f"- **SenseVoice's ceiling on these cores: {ceiling:g} devices{ratio}**: the {left:.2f} of {cpus} cores "
            f"the rest left it, at the {lv.cores['SenseVoice'] / lv.admitted:.3f} cores per device it used; "
            "reached only with every core busy, so held stays below it")  # fmt: skip


def sweep(cfg: SweepConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clips = load_corpus(Path(cfg.corpus))
    share = speech_share(clips, cfg.pause_s)
    print(f"sweep: levels {cfg.levels}, {cfg.protocol}, speech share {share:.0%}; waiting for a quiet service",
          flush=True)  # fmt: skip
    wait_quiet(cfg, None)
    time.sleep(5.0)  # let start-up work settle
    idle = service_cores(10.0)
    print(f"idle service CPU: {idle}", flush=True)
    meter = BoundMeter(cfg, clips) if cfg.bound else None
    levels, raw = [], []
    try:
        for offered in cfg.levels:
            level, level_raw = run_level(cfg, offered, clips, out, sum(idle.values()), meter)
            levels.append(level)
            raw.append(level_raw)
            print(f"level {offered}: admitted {level.admitted}, refused {level.refused}, lost {level.lost}/"
                  f"{level.utterances}, p50 {level.p50_s} s, p95 {level.p95_s} s, cores {level.cores}, "
                  f"bound before it {level.bound_before} speech-s/s", flush=True)  # fmt: skip
    finally:
        if meter:
            meter.close()
    bound = meter.result() if meter else None
    bound_devices = bound["speech_s_per_s"] / share if bound else None
    plot(out, levels, cfg, bound_devices)
    capacity = node_capacity(levels, model_node(levels), {
        "protocol": cfg.protocol, "together": cfg.together, "speech_share": round(share, 3),
        "speaker": any(lv.speaker_ran for lv in levels), "utterances_per_device": cfg.utterances})  # fmt: skip
    (out / CAPACITY_FILE).write_text(json.dumps(capacity, indent=1))
    report = render(cfg, levels, idle, bound, share, capacity)
    (out / "report.md").write_text(report)
    summary = {
        "config": {k: v for k, v in asdict(cfg).items() if k != "auth_secret"},
        "speech_share": round(share, 3), "idle_cores": idle, "bound": bound,
        "bound_devices": round(bound_devices, 2) if bound_devices else None,
        "held": held_devices(levels, cfg.target_p95_s),
        "held_per_asr_node": (at := held_level(levels, cfg.target_p95_s)) and at.per_asr_node,
        "ceiling_devices": at and at.ceiling(host_cpus()),
        "levels": [asdict(lv) for lv in levels],
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "raw.json").write_text(json.dumps(raw))
    print(report)
    return summary


def parse_args(argv: list[str] | None = None) -> SweepConfig:
    from speech_serve.wire.tokens import DEFAULT_SECRET_ENV

    d = SweepConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=d.url, help="service base URL (ws://host:port)")
    p.add_argument("--protocol", default=d.protocol, choices=["xiaozhi", "funasr", "plain", "mix"])
    p.add_argument(
        "--funasr-mode",
        default=d.funasr_mode,
        choices=["offline", "2pass"],
        help="FunASR devices: offline (finals only, the default) or 2pass (interims as well)",
    )
    p.add_argument("--levels", default=",".join(map(str, d.levels)), help="devices offered per level, e.g. 1,2,4,8")
    p.add_argument("--utterances", type=int, default=d.utterances, help="utterances per device per level")
    p.add_argument(
        "--pause",
        default=f"{d.pause_s[0]}/{d.pause_s[1]}",
        help="MIN/MAX seconds of silence between utterances (keep MIN above the VAD's end silence)",
    )
    p.add_argument("--target-p95", type=float, default=d.target_p95_s, help="latency target, seconds")
    p.add_argument("--lost-after", type=float, default=d.lost_after_s, help="a result later than this is lost (s)")
    p.add_argument("--corpus", default=d.corpus)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--together",
        action="store_true",
        help="devices start at once and stream the same recording: their utterances end together (worst case)",
    )
    p.add_argument("--no-bound", action="store_true", help="skip the compute-bound measurement")
    p.add_argument(
        "--bound-size",
        default=d.bound_size,
        choices=["tiny", "full"],
        help="test-model size for the bound: the one the service runs",
    )
    p.add_argument("--asr-model", default=None, help="local SenseVoice directory for the bound (real weights)")
    p.add_argument(
        "--bound-threads", type=int, default=d.bound_threads, help="torch threads, as the service's asr.threads"
    )
    p.add_argument(
        "--bound-quantize",
        default=d.bound_quantize,
        choices=["auto", "none", "int8"],
        help="SenseVoice precision for the bound, as the service's asr.quantize (auto: ask its /healthz)",
    )
    p.add_argument(
        "--bound-engine",
        default=d.bound_engine,
        choices=["auto", "onednn", "x86", "fbgemm"],
        help="torch's int8 kernels for the bound, as the service's asr.quantized_engine (auto: ask its /healthz)",
    )
    p.add_argument("--bound-batch", type=int, default=d.bound_batch, help="batch size, as the service's max_batch_size")
    p.add_argument(
        "--auth-secret-env",
        default=DEFAULT_SECRET_ENV,
        help="env var with the device-token secret, when device auth is on",
    )
    p.add_argument(
        "--dashboard",
        default=d.dashboard,
        help="Ray dashboard address, for the nodes and the replicas on each (devices per node); 'none' to skip",
    )
    p.add_argument("--out", default=None, help="report folder (default loadtest/reports/sweep-<time>)")
    a = p.parse_args(argv)
    lo, hi = (float(x) for x in a.pause.split("/"))
    return SweepConfig(
        url=a.url, protocol=a.protocol, funasr_mode=a.funasr_mode, levels=[int(x) for x in a.levels.split(",")],
        utterances=a.utterances,
        pause_s=(lo, hi), target_p95_s=a.target_p95, lost_after_s=a.lost_after, corpus=a.corpus, seed=a.seed,
        together=a.together, auth_secret=os.environ.get(a.auth_secret_env),
        out=a.out or f"loadtest/reports/sweep-{time.strftime('%Y%m%d-%H%M%S')}",
        bound=not a.no_bound, bound_size=a.bound_size, asr_model=a.asr_model, bound_threads=a.bound_threads,
        bound_quantize=a.bound_quantize, bound_engine=a.bound_engine, bound_batch=a.bound_batch,
        dashboard=None if a.dashboard.lower() == "none" else a.dashboard,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    sweep(parse_args(argv))


if __name__ == "__main__":
    main()

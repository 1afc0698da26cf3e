"""Load-test report: aggregates, a Markdown summary, PNG plots and the raw numbers as JSON."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import asdict
from pathlib import Path

import numpy as np

from speech_serve.loadtest.records import LoadConfig, RunState, UtteranceRecord


def cer(reference: str, hypothesis: str) -> float:
    """Character error rate on letters and digits only (tags, spaces, punctuation ignored)."""

    def norm(s: str) -> str:
        s = re.sub(r"<\|[^|]*\|>", "", unicodedata.normalize("NFKC", s).lower())
        return "".join(ch for ch in s if ch.isalnum())

    ref, hyp = norm(reference), norm(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1] / len(ref)


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


def summarize(cfg: LoadConfig, state: RunState) -> dict:
    records = state.records
    done = [r for r in records if r.result_t is not None]
    lat = [r.latency_s for r in done]
    first = [r.first_interim_t - r.speech_end_t + r.audio_s for r in done if r.first_interim_t]  # from speech start
    span = max((r.result_t for r in done), default=state.started) - state.started
    real = [r for r in done if r.models == "real" and r.reference and r.text is not None]
    return {
        "protocol": cfg.protocol, "clients": cfg.clients, "duration_s": cfg.duration_s,
        "ramp": f"+{cfg.ramp_step} every {cfg.ramp_every_s:g} s", "seed": cfg.seed, "corpus": cfg.corpus,
        "devices_connected": state.connected, "max_live_sessions": max((r["live"] for r in state.replicas), default=0),
        "utterances_sent": len(records), "results": len(done), "lost": len(records) - len(done),
        "duplicated": state.duplicates, "connection_errors": len(state.connection_errors),
        "refused": len(state.refused),
        "error_frames": len(state.unexpected),
        "audio_seconds": round(sum(r.audio_s for r in records), 1),
        "throughput_utterances_per_s": round(len(done) / span, 2) if span > 0 else 0.0,
        "latency_s": {"p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99), "max": pct(lat, 100)},
        "first_interim_from_speech_start_s": {"p50": pct(first, 50), "p95": pct(first, 95)} if first else None,
        "server_ms_p50": pct([r.server_ms for r in done if r.server_ms is not None], 50),
        "models": sorted({r.models for r in done if r.models}),
        "cer": round(float(np.mean([cer(r.reference, r.text) for r in real])), 3) if real else None,
        "cpu_seconds": state.cpu_seconds,
        "server_cpu_s_per_audio_s": _server_cpu_per_audio(state, records),
        "max_replicas": {
            name: max(s["deployments"].get(name, 0) for s in state.replicas)
            for name in sorted({n for s in state.replicas for n in s["deployments"]})
        },
    }  # fmt: skip


def _server_cpu_per_audio(state: RunState, records: list[UtteranceRecord]) -> float | None:
    """Server CPU seconds (all Serve processes, not the load generator) per second of audio streamed.

    The audio streamed is the speech plus the pauses: every device streams continuously."""
    server = sum(v for k, v in state.cpu_seconds.items() if k != "loadgen")
    streamed = sum(r.audio_s for r in records) + sum(r.pause_s for r in records)
    return round(server / streamed, 3) if server and streamed else None


def latency_by_load(done: list[UtteranceRecord]) -> list[tuple[int, int, float, float, float]]:
    """(live sessions bucket, count, p50, p95, p99) for plotting latency against load."""
    if not done:
        return []
    width = max(1, max(r.live_at_end for r in done) // 10)
    buckets: dict[int, list[float]] = {}
    for r in done:
        buckets.setdefault(r.live_at_end // width * width, []).append(r.latency_s)
    return [(k, len(v), *np.percentile(v, [50, 95, 99])) for k, v in sorted(buckets.items())]


def plot(out: Path, state: RunState) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in state.records if r.result_t is not None]
    files = []
    rows = latency_by_load(done)
    fig, ax = plt.subplots(figsize=(7, 4))
    if rows:
        x = [r[0] for r in rows]
        for i, label in ((2, "p50"), (3, "p95"), (4, "p99")):
            ax.plot(x, [r[i] for r in rows], marker="o", label=label)
    ax.axhline(1.5, color="grey", linestyle="--", linewidth=1, label="1.5 s")
    ax.set(xlabel="live sessions when the speech ended", ylabel="end of speech to result (s)",
           title="Latency vs live sessions")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "latency_vs_sessions.png", dpi=110)
    files.append("latency_vs_sessions.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = sorted({n for s in state.replicas for n in s["deployments"]})
    t = [s["t"] for s in state.replicas]
    for name in names:
        ax.step(t, [s["deployments"].get(name, 0) for s in state.replicas], where="post", label=name)
    top = max((s["deployments"].get(n, 0) for s in state.replicas for n in names), default=1)
    ax.set_ylim(0, top + 1)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set(
        xlabel="time (s)", ylabel="running replicas", title="Replicas per deployment (overlapping lines: same count)"
    )
    ax2 = ax.twinx()
    ax2.plot(t, [s["live"] for s in state.replicas], color="black", alpha=0.3, label="live sessions")
    ax2.set_ylabel("live sessions")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "replicas_over_time.png", dpi=110)
    files.append("replicas_over_time.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist([r.latency_s for r in done], bins=40)
    ax.set(xlabel="end of speech to result (s)", ylabel="utterances", title="Latency histogram")
    fig.tight_layout()
    fig.savefig(out / "latency_histogram.png", dpi=110)
    files.append("latency_histogram.png")
    plt.close(fig)
    return files


def write_report(cfg: LoadConfig, state: RunState) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(cfg, state)
    plots = plot(out, state)
    raw = {
        "summary": summary,
        "config": {k: v for k, v in asdict(cfg).items() if k != "auth_secret"},
        "utterances": [asdict(r) for r in state.records],
        "replicas": state.replicas,
        "connection_errors": state.connection_errors,
        "refused": state.refused,
        "error_frames": state.unexpected[:100],
    }
    (out / "raw.json").write_text(json.dumps(raw, indent=1, ensure_ascii=False))
    lat = summary["latency_s"]
    lines = [
        f"# Load test: {summary['clients']} {summary['protocol']} devices, {summary['duration_s']:g} s",
        "",
        f"- ramp {summary['ramp']}, seed {summary['seed']}, corpus `{summary['corpus']}`, models {summary['models']}",
        f"- devices connected {summary['devices_connected']}, most live at once {summary['max_live_sessions']}, "
        f"refused at connect (over a session cap) {summary['refused']}",
        f"- utterances sent {summary['utterances_sent']} ({summary['audio_seconds']} s of speech), results "
        f"{summary['results']}, **lost {summary['lost']}, duplicated {summary['duplicated']}, connection errors "
        f"{summary['connection_errors']}**, error frames {summary['error_frames']}",
        f"- end of speech to result: p50 {lat['p50']} s, **p95 {lat['p95']} s**, p99 {lat['p99']} s, "
        f"max {lat['max']} s",
        f"- throughput {summary['throughput_utterances_per_s']} utterances/s; server_ms p50 {summary['server_ms_p50']}",
        f"- first interim (from speech start): {summary['first_interim_from_speech_start_s']}",
        f"- CER: {summary['cer'] if summary['cer'] is not None else 'n/a (needs real models and transcripts)'}",
        f"- most replicas running: {summary['max_replicas']}",
        f"- server CPU-seconds per streamed audio-second: {summary['server_cpu_s_per_audio_s']}; "
        f"CPU-seconds by process: {summary['cpu_seconds']}",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
    ]  # fmt: skip
    report = out / "report.md"
    report.write_text("\n".join(lines))
    summary["report"] = str(report)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

"""Single-session pipeline benchmark (not a test): server stage latencies next to bare model time.

    python loadtest/bench_pipeline.py                  # full-size models (built on first use)
    python loadtest/bench_pipeline.py --size tiny --runs 3

In one run on one machine:
1. bare: `AutoModel.generate` of SenseVoice and the speaker model on each utterance clip of
   the WAV, alone, and both at once in two threads (which is what the pipeline does);
   fsmn-vad streaming cost per audio-second.
2. served: the same WAV streamed in real time through a local Ray Serve (plain WebSocket protocol),
   one session at a time, recording every stage's latency from the results.
Prints a Markdown table and writes the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deployments.models import load_automodel, materialize, resolve_models  # noqa: E402
from examples.plain_client import stream_file  # noqa: E402
from serve_app.settings import ModelSettings, VadSettings  # noqa: E402

DEFAULT_WAV = ROOT / "tests" / "fixtures" / "two_utterances.wav"


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples), 1)


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return (time.perf_counter() - started) * 1000


def bare(models, clips: list[np.ndarray], runs: int, threads: int) -> dict:
    from deployments.vad import VadCore
    from serve_app.wire import to_float32

    asr = load_automodel(models.asr, device="cpu", threads=threads)
    spk = load_automodel(models.speaker, device="cpu", threads=threads)
    out: dict = {"clips": []}
    for clip in clips:
        x = to_float32(clip)
        asr.generate(input=x, language="auto", use_itn=True)  # warm up
        spk.generate(input=x)
        a = [timed(asr.generate, input=x, language="auto", use_itn=True) for _ in range(runs)]
        s = [timed(spk.generate, input=x) for _ in range(runs)]
        both = []
        with ThreadPoolExecutor(2) as pool:
            for _ in range(runs):
                started = time.perf_counter()
                f1 = pool.submit(asr.generate, input=x, language="auto", use_itn=True)
                f2 = pool.submit(spk.generate, input=x)
                f1.result(), f2.result()
                both.append((time.perf_counter() - started) * 1000)
        out["clips"].append(
            {
                "seconds": len(clip) / 16000,
                "asr_ms": median_ms(a),
                "speaker_ms": median_ms(s),
                "both_ms": median_ms(both),
            }
        )
    del asr, spk
    gc.collect()
    vad = VadCore(models.vad, VadSettings())
    audio = np.concatenate([c for c in clips] * 10)
    step = 200 * 16
    started = time.perf_counter()
    for i in range(0, len(audio), step):
        vad.feed("bench", audio[i : i + step], i // 16, final=i + step >= len(audio))
    out["vad_ms_per_audio_s"] = round((time.perf_counter() - started) * 1000 / (len(audio) / 16000), 2)
    return out


def served(model_settings: ModelSettings, wav: Path, runs: int, threads: int) -> dict:
    import ray
    from ray import serve

    from serve_app.app import free_port, run_local

    port = free_port()
    placement = {n: {"num_cpus": 0} for n in ("Ingress", "VADHost", "SenseVoice", "Speaker")}
    args = {
        "models": model_settings.model_dump(),
        "asr": {"threads": threads},
        "speaker": {"threads": threads},
        "placement": placement,
    }
    base = run_local(args, port)
    stream_file(f"ws://{base}/v1/stream", str(wav), realtime=True)  # warm up every replica
    per_utt: list[dict] = []
    for _ in range(runs):
        for r in stream_file(f"ws://{base}/v1/stream", str(wav), realtime=True):  # paced like a device
            per_utt.append({"index": r["index"], **r["latency_ms"]})
    serve.shutdown()
    ray.shutdown()
    return {"utterances": per_utt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--wav", type=Path, default=DEFAULT_WAV)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per model, as in config/serve.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "reports" / "bench_pipeline.json")
    args = parser.parse_args()

    model_settings = ModelSettings(test_model_size=args.size)
    models = resolve_models(model_settings)
    for source in (models.asr, models.speaker):
        print(f"preparing {source.describe()} ...", flush=True)
        materialize(source)

    from serve_app.wire import ms_to_samples
    from tests.conftest import read_pcm

    pcm = read_pcm(args.wav)
    from deployments.vad import VadCore

    segments = VadCore(models.vad, VadSettings()).segment(pcm)
    clips = [pcm[ms_to_samples(a) : ms_to_samples(b)] for a, b in segments]
    print(f"{len(clips)} utterances in {args.wav.name}: {segments}", flush=True)

    bare_numbers = bare(models, clips, args.runs, args.threads)
    print("bare:", json.dumps(bare_numbers), flush=True)
    served_numbers = served(model_settings, args.wav, args.runs, args.threads)

    rows = []
    for i, clip in enumerate(bare_numbers["clips"]):
        utts = [u for u in served_numbers["utterances"] if u["index"] == i]
        stage = {k: median_ms([u[k] for u in utts]) for k in utts[0] if k != "index"}
        overhead = stage["server_ms"] - clip["both_ms"]
        rows.append(
            f"| {i} ({clip['seconds']:.2f} s) | {clip['asr_ms']} | {clip['speaker_ms']} | {clip['both_ms']} "
            f"| {stage['asr_model_ms']} | {stage['asr_ms']} | {stage['speaker_model_ms']} | {stage['speaker_ms']} "
            f"| {stage['vad_ms']} | {stage['server_ms']} | {overhead:+.1f} ms ({overhead / clip['both_ms']:+.0%}) |"
        )
    header = (
        "| utterance | bare ASR | bare speaker | bare both (2 threads) | ASR in replica | ASR round trip "
        "| speaker in replica | speaker round trip | VAD call | server total | overhead vs bare both |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print(f"\nmodels: {args.size}, {args.runs} runs, medians in ms, torch threads {args.threads}\n")
    print(header)
    print("\n".join(rows))
    print(f"\nfsmn-vad streaming (200 ms chunks, one thread): {bare_numbers['vad_ms_per_audio_s']} ms per audio-second")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "bare": bare_numbers, "served": served_numbers}, indent=1))
    print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()

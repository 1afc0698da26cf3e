"""VAD step benchmark (not a test): what a VADHost spends per session and chunk, in-process.

    speech-serve bench-vad                                         # 16 sessions, 200 ms chunks, 5 runs
    speech-serve bench-vad --sessions 32 --profile

`VadCore.feed_many` (the VADHost's work for one lane call, without Serve) on the bundled fsmn-vad,
one torch thread, every session fed one chunk per round: corpus clips with the capacity sweep's
pauses (1.2-2 s), as its devices speak. Prints CPU milliseconds per session-chunk for each run (min and
median) and the speech events found, which must not change when the step gets cheaper.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from speech_serve.loadtest.records import load_corpus
from speech_serve.loadtest.sweep import SweepConfig
from speech_serve.messages import VadChunk, VadItem
from speech_serve.replicas.models import resolve_models
from speech_serve.replicas.vad import VadCore
from speech_serve.settings import ModelSettings, VadSettings
from speech_serve.wire.pcm import SAMPLES_PER_MS

ROOT = Path(__file__).resolve().parents[2]  # the repository (fixtures, corpus)

CORPUS = ROOT / "loadtest" / "corpus"


def session_audio(sessions: int, utterances: int, seed: int = 1) -> list[np.ndarray]:
    """Each session's audio: corpus clips after pauses drawn from the sweep's range."""
    clips = [clip.pcm for clip in load_corpus(CORPUS)]
    low, high = SweepConfig().pause_s
    rng = np.random.default_rng(seed)
    out = []
    for s in range(sessions):
        parts = []
        for k in range(utterances):
            parts += [np.zeros(int(16000 * rng.uniform(low, high)), np.int16), clips[(s * utterances + k) % len(clips)]]
        out.append(np.concatenate(parts))
    return out


def run(core: VadCore, audio: list[np.ndarray], chunk: int) -> tuple[float, int, int]:
    """(CPU seconds, session-chunks, events) for every session fed chunk by chunk, then closed."""
    rounds = min(len(a) for a in audio) // chunk
    events = 0
    started = time.process_time()
    for r in range(rounds):
        items = [
            VadItem(f"s{s}", VadChunk(a[r * chunk : (r + 1) * chunk], r * chunk // 16, False, False))
            for s, a in enumerate(audio)
        ]
        events += sum(len(result.events) for result in core.feed_many(items))
    spent = time.process_time() - started
    for s in range(len(audio)):
        core.close(f"s{s}")
    return spent, rounds * len(audio), events


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=16, help="sessions per feed_many call")
    p.add_argument("--chunk-ms", type=int, default=200, help="audio per session per call (stream.vad_chunk_ms)")
    p.add_argument("--utterances", type=int, default=6, help="utterances per session")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="cProfile one more run, top functions by own time")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    source = resolve_models(ModelSettings(), hub_up=False).vad
    core = VadCore(source, VadSettings(max_end_silence_ms=800, threads=1))
    audio = session_audio(args.sessions, args.utterances)
    chunk = args.chunk_ms * SAMPLES_PER_MS
    run(core, audio, chunk)  # warm-up
    per_chunk_ms, found = [], set()
    for _ in range(args.runs):
        spent, chunks, events = run(core, audio, chunk)
        per_chunk_ms.append(spent / chunks * 1000)
        found.add(events)
    print(f"{args.sessions} sessions, {args.chunk_ms} ms chunks, {args.runs} runs: CPU ms per session-chunk "
          f"{', '.join(f'{x:.3f}' for x in per_chunk_ms)} (min {min(per_chunk_ms):.3f}, median "
          f"{statistics.median(per_chunk_ms):.3f}); cores per live session "
          f"{statistics.median(per_chunk_ms) / args.chunk_ms:.4f}; speech events per run {sorted(found)}")  # fmt: skip
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(core, audio, chunk)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

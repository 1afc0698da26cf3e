"""What words, confidences and hotwords cost SenseVoice (not a test): one replica's `AsrCore`, as
prepared by the shipped settings, transcribing batches of the fixture's utterances three ways.

    speech-serve bench-decode                 # full-size model (built on first use)
    speech-serve bench-decode --size tiny --runs 3

- plain: funasr's generate() and its greedy decode (what every request without words or hotwords gets);
- words: the same pass with its posteriors captured and decoded greedily for word times and confidences;
- hotwords: the same, decoded by the beam search with `--hotwords` phrases per utterance.
Batches of 1 and `--batch`; each figure the min and median of `--runs`. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from speech_serve.loadtest.bench_pipeline import DEFAULT_WAV
from speech_serve.messages import AsrRequest
from speech_serve.replicas.asr import AsrCore
from speech_serve.replicas.models import materialize, resolve_models
from speech_serve.settings import AsrSettings, ModelSettings
from speech_serve.wire.client import read_wav
from speech_serve.wire.pcm import SAMPLE_RATE

PHRASES = ["turn on the light", "living room", "Xiaozhi", "weather today", "set a timer", "play some music",
           "kitchen", "good morning", "what time is it", "volume up"]  # fmt: skip


def timed(asr: AsrCore, requests: list[AsrRequest], runs: int) -> tuple[float, float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        asr.transcribe_batch(requests)
        samples.append((time.perf_counter() - started) * 1000)
    return round(min(samples), 1), round(statistics.median(samples), 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hotwords", type=int, default=10, help="phrases per utterance (from a fixed list)")
    args = parser.parse_args(argv)

    models = resolve_models(ModelSettings(allow_test_models=True, test_model_size=args.size))
    materialize(models.asr)
    settings = AsrSettings(threads=1)
    asr = AsrCore(models.asr, settings)
    data, rate = read_wav(str(DEFAULT_WAV))
    assert rate == SAMPLE_RATE
    clip = np.frombuffer(data, dtype="<i2").astype(np.int16)[: 5 * SAMPLE_RATE]  # 5 s: an utterance
    hotwords = tuple((p, 1.5) for p in (PHRASES * 10)[: args.hotwords])
    modes = {"plain": {}, "words": {"words": True}, "hotwords": {"words": True, "hotwords": hotwords}}
    asr.transcribe_batch([AsrRequest(clip)])  # the first call's one-off costs
    print(f"SenseVoice {args.size}, {asr.precision}, 1 thread; 5 s utterances; min / median of {args.runs} runs, ms")
    print(f"| batch | plain | words (greedy) | hotwords (beam {settings.beam_size}, {args.hotwords} phrases) |")
    print("|---|---|---|---|")
    for batch in (1, args.batch):
        cells = []
        for extra in modes.values():
            low, mid = timed(asr, [AsrRequest(clip, **extra)] * batch, args.runs)
            cells.append(f"{low} / {mid}")
        print(f"| {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Single-session pipeline benchmark (not a test): server stage latencies next to bare model time.

    speech-serve bench                                              # full-size models (built on first use)
    speech-serve bench --size tiny --runs 3
    speech-serve bench --profile config/capacity.yaml  # a profile's settings

In one run on one machine:
1. bare: `AutoModel.generate` of SenseVoice, prepared as a replica prepares it (`AsrCore`: the
   profile's precision, kernels, trace and threads), and of the speaker model on each utterance
   clip of the WAV, alone, and both at once in two threads (which is what the pipeline does);
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from speech_serve.cli import profile
from speech_serve.replicas.models import load_automodel, materialize, resolve_models
from speech_serve.settings import AsrSettings, ModelSettings, SpeakerSettings, VadSettings
from speech_serve.wire.client import read_wav, stream_file
from speech_serve.wire.pcm import SAMPLE_RATE, SAMPLES_PER_MS

ROOT = Path(__file__).resolve().parents[2]  # the repository (fixtures, corpus)

DEFAULT_WAV = ROOT / "tests" / "fixtures" / "two_utterances.wav"


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples), 1)


def timed(fn, *args, **kwargs) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return (time.perf_counter() - started) * 1000


def app_args(path: Path | None, size: str, threads: int) -> dict:
    """The application args both halves run with: a profile's (its models, SenseVoice's
    precision and threads, the speaker on or off), or config/serve.yaml's defaults at --size and
    --threads."""
    if path is None:
        return {"models": {"test_model_size": size}, "asr": {"threads": threads}, "speaker": {"threads": threads}}
    args = profile.load(path)["applications"][0]["args"]
    return {k: args[k] for k in ("models", "asr", "speaker", "vad") if k in args}


def model_ms(core, request) -> float:
    """SenseVoice's time on one clip through the replica's own call (`AsrCore.transcribe_batch`, a
    batch of one): what a served result's `asr_model_ms` says."""
    return core.transcribe_batch([request])[0].model_ms


def bare(models, clips: list[np.ndarray], runs: int, asr_settings: AsrSettings, speaker_threads: int | None) -> dict:
    """speaker_threads None: the speaker model is off (as in the capacity profiles)."""
    from speech_serve.messages import AsrRequest, to_float32
    from speech_serve.replicas.asr import AsrCore
    from speech_serve.replicas.vad import VadCore

    asr = AsrCore(models.asr, asr_settings)  # loaded and prepared as a SenseVoice replica does
    spk = None if speaker_threads is None else load_automodel(models.speaker, device="cpu", threads=speaker_threads)
    out: dict = {"clips": []}
    for clip in clips:
        x = to_float32(clip)
        request = AsrRequest(clip, asr_settings.language, asr_settings.use_itn)
        model_ms(asr, request)  # warm up
        a = [model_ms(asr, request) for _ in range(runs)]
        numbers = {"seconds": len(clip) / 16000, "asr_ms": median_ms(a)}
        if spk is not None:
            spk.generate(input=x)
            s = [timed(spk.generate, input=x) for _ in range(runs)]
            both = []
            with ThreadPoolExecutor(2) as pool:
                for _ in range(runs):
                    started = time.perf_counter()
                    f1 = pool.submit(model_ms, asr, request)
                    f2 = pool.submit(spk.generate, input=x)
                    f1.result(), f2.result()
                    both.append((time.perf_counter() - started) * 1000)
            numbers |= {"speaker_ms": median_ms(s), "both_ms": median_ms(both)}
        out["clips"].append(numbers)
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


def served(app: dict, wav: Path, runs: int) -> dict:
    import ray
    from ray import serve

    from speech_serve.app import free_port, run_local

    port = free_port()
    placement = {n: {"num_cpus": 0} for n in ("Ingress", "VADHost", "SenseVoice", "Speaker")}
    base = run_local({**app, "placement": placement}, port)
    stream_file(f"ws://{base}/v1/stream", str(wav), realtime=True)  # warm up every replica
    per_utt: list[dict] = []
    for _ in range(runs):
        for r in stream_file(f"ws://{base}/v1/stream", str(wav), realtime=True):  # paced like a device
            per_utt.append({"index": r["index"], **r["latency_ms"]})
    serve.shutdown()
    ray.shutdown()
    return {"utterances": per_utt}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "full"], default="full")
    parser.add_argument("--wav", type=Path, default=DEFAULT_WAV)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per model, as in config/serve.yaml")
    parser.add_argument("--profile", type=Path, help="a config profile (overlay of serve.yaml) whose models, "
                        "SenseVoice settings and speaker on/off both halves use; --size and --threads are then ignored")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest" / "reports" / "bench_pipeline.json")
    args = parser.parse_args(argv)

    app = app_args(args.profile, args.size, args.threads)
    model_settings = ModelSettings(**app["models"])
    asr_settings = AsrSettings(**app.get("asr", {}))
    speaker = SpeakerSettings(**app.get("speaker", {}))
    speaker_threads = speaker.threads if speaker.enabled else None
    vad_settings = VadSettings(**app.get("vad", {}))  # the clips as the served VAD cuts them
    models = resolve_models(model_settings)
    for source in (models.asr, models.speaker):
        print(f"preparing {source.describe()} ...", flush=True)
        materialize(source)

    data, rate = read_wav(str(args.wav))
    assert rate == SAMPLE_RATE, f"{args.wav}: {rate} Hz; the bench takes 16 kHz WAVs"
    pcm = np.frombuffer(data, dtype="<i2").astype(np.int16)
    from speech_serve.replicas.vad import VadCore

    segments = VadCore(models.vad, vad_settings).segment_piece("bench", pcm, 0, final=True)  # the file in one piece
    clips = [pcm[a * SAMPLES_PER_MS : b * SAMPLES_PER_MS] for a, b in segments]
    print(f"{len(clips)} utterances in {args.wav.name}: {segments}", flush=True)

    bare_numbers = bare(models, clips, args.runs, asr_settings, speaker_threads)
    print("bare:", json.dumps(bare_numbers), flush=True)
    served_numbers = served(app, args.wav, args.runs)

    rows = []
    for i, clip in enumerate(bare_numbers["clips"]):
        utts = [u for u in served_numbers["utterances"] if u["index"] == i]
        stage = {k: median_ms([u[k] for u in utts]) for k in utts[0] if k != "index"}
        models_bare = clip.get("both_ms", clip["asr_ms"])  # what the models cost together, bare
        overhead = stage["server_ms"] - models_bare
        rows.append(
            f"| {i} ({clip['seconds']:.2f} s) | {clip['asr_ms']} | {clip.get('speaker_ms', 'off')} "
            f"| {clip.get('both_ms', 'off')} | {stage['asr_model_ms']} ({stage['asr_model_ms'] / clip['asr_ms']:.2f}x) "
            f"| {stage['asr_ms']} | {stage.get('speaker_model_ms', 'off')} | {stage.get('speaker_ms', 'off')} "
            f"| {stage['vad_ms']} | {stage['server_ms']} | {overhead:+.1f} ms ({overhead / models_bare:+.0%}) |"
        )
    header = (
        "| utterance | bare ASR | bare speaker | bare both (2 threads) | ASR in replica (/ bare) | ASR round trip "
        "| speaker in replica | speaker round trip | VAD call | server total | overhead vs the bare models |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print(f"\nmodels: {model_settings.test_model_size}, {args.runs} runs, medians in ms, SenseVoice "
          f"{asr_settings.model_dump(include={'threads', 'quantize', 'trace_encoder'})}, "
          f"speaker {'on' if speaker.enabled else 'off'}\n")  # fmt: skip
    print(header)
    print("\n".join(rows))
    print(f"\nfsmn-vad streaming (200 ms chunks, one thread): {bare_numbers['vad_ms_per_audio_s']} ms per audio-second")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"app": app, "bare": bare_numbers, "served": served_numbers}, indent=1))
    print(f"raw numbers: {args.out}")


if __name__ == "__main__":
    main()

"""What a load run is and what it records: the corpus clips, the run's configuration, one record per
utterance, the run's state (the load tool writes them, the report and the sweep read them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

FRAME_MS = 60
FRAME_SAMPLES = 16 * FRAME_MS
PROTOCOLS = ("xiaozhi", "funasr", "plain")


@dataclass
class Clip:
    name: str
    pcm: np.ndarray  # int16 16 kHz
    text: str | None
    opus: list[bytes] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 16000


def load_corpus(folder: Path) -> list[Clip]:
    """WAVs (any rate, mono or not) and an optional transcripts.tsv (file<TAB>text)."""
    texts = {}
    tsv = folder / "transcripts.tsv"
    if tsv.exists():
        for line in tsv.read_text(encoding="utf-8").splitlines():
            name, _, text = line.partition("\t")
            texts[name] = text
    clips = []
    for path in sorted(folder.glob("*.wav")):
        data, rate = sf.read(path, dtype="int16", always_2d=True)
        pcm = data.mean(axis=1).astype(np.int16)
        if rate != 16000:
            import soxr

            pcm = soxr.resample(pcm, rate, 16000)
        clips.append(Clip(path.name, pcm, texts.get(path.name)))
    if not clips:
        raise SystemExit(f"no .wav files in {folder}")
    return clips


@dataclass
class LoadConfig:
    url: str = "ws://127.0.0.1:8000"
    protocol: str = "xiaozhi"  # xiaozhi | funasr | plain | mix
    funasr_mode: str = "2pass"  # FunASR devices: 2pass (interims + finals) or offline (finals only)
    clients: int = 20
    ramp_step: int = 5  # devices added ...
    ramp_every_s: float = 10.0  # ... this often
    duration_s: float = 60.0  # from the first device's start; then devices finish their utterance
    pause_s: tuple[float, float] = (1.5, 4.0)
    together: bool = False  # every device starts at once and streams the same clips and pauses
    corpus: str = "loadtest/corpus"
    seed: int = 1
    grace_s: float = 15.0  # wait this long for the last results
    serve_api: str = "http://127.0.0.1:8265"
    auth_secret: str | None = None  # issue device tokens (every protocol) with this secret
    out: str = "loadtest/reports/latest"
    progress_every_s: float = 5.0


@dataclass
class UtteranceRecord:
    device: int
    protocol: str
    seq: int
    clip: str
    reference: str | None
    audio_s: float
    speech_end_t: float = 0.0  # when its last speech frame was sent
    result_t: float | None = None
    first_interim_t: float | None = None
    text: str | None = None
    models: str | None = None
    server_ms: float | None = None
    stages_ms: dict | None = None  # the server's latency_ms: where the time went
    live_at_end: int = 0  # devices connected when the speech ended
    pause_s: float = 0.0  # silence streamed after it

    @property
    def latency_s(self) -> float | None:
        return None if self.result_t is None else self.result_t - self.speech_end_t


@dataclass
class RunState:
    records: list[UtteranceRecord] = field(default_factory=list)
    live: int = 0
    connected: int = 0
    connection_errors: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # refusal codes: the service said no at connect
    duplicates: int = 0
    unexpected: list[str] = field(default_factory=list)
    replicas: list[dict] = field(default_factory=list)  # {"t": s, "live": n, "deployments": {name: running}}
    started: float = 0.0
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # by process kind, over the run

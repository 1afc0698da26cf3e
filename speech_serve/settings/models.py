"""Where the models come from (speech_serve/replicas/models/ resolves them)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from speech_serve.settings.base import Section


class ModelSpec(Section):
    """Where one model comes from: an explicit directory first, then the hub id."""

    path: str | None = Field(None, description="Local model directory; wins over the hub.")
    hub_id: str = Field(..., description="ModelScope (or Hugging Face) model id.")


class ModelSettings(Section):
    hub: Literal["ms", "hf"] = Field("ms", description="The model hub: ms (ModelScope) or hf (Hugging Face).")
    hub_probe_timeout_s: float = Field(3.0, description="How long to wait for the hub before falling back.")
    allow_test_models: bool = Field(
        True, description="Fall back to locally built random-weight models when the hub is unreachable."
    )
    require_real_models: bool = Field(
        False, description="Refuse to start with random-weight models (overrides allow_test_models)."
    )
    test_model_size: Literal["tiny", "full"] = Field(
        "tiny", description="tiny: fast, for tests. full: the real architecture, for benchmarks."
    )
    cache_dir: str = Field("~/.cache/speech-serve/models", description="Where test models are built.")
    vad: ModelSpec = Field(
        ModelSpec(hub_id="iic/speech_fsmn_vad_zh-cn-16k-common-pytorch"), description="The fsmn-vad model."
    )
    asr: ModelSpec = Field(ModelSpec(hub_id="iic/SenseVoiceSmall"), description="The SenseVoiceSmall model.")
    speaker: ModelSpec = Field(
        ModelSpec(hub_id="iic/speech_eres2netv2_sv_zh-cn_16k-common"),
        description="The speaker model (ERes2NetV2, or CAM++: iic/speech_campplus_sv_zh-cn_16k-common).",
    )
    speaker_arch: Literal["eres2netv2", "campplus"] = Field(
        "eres2netv2", description="Architecture of the random-weight speaker model built for tests."
    )
    speaker_backend: Literal["funasr", "ge2e"] = Field(
        "funasr",
        description="funasr: ERes2NetV2/CAM++ (192-d) through AutoModel. ge2e: resemblyzer's GE2E encoder "
        "(256-d, real weights shipped in its wheel: speaker identity works offline).",
    )

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser()

"""Download the real models ahead of time and verify them (`speech-serve models fetch`).

Each model the settings load from a hub (`hub_models`: fsmn-vad, SenseVoiceSmall, the speaker model
unless GE2E replaces it) is downloaded by the hub's own client into `<cache>/models/<hub id>`, the
first place `resolve_models` looks (cache: MODELSCOPE_CACHE, or --cache-dir, for either hub). Then it
is verified: every file the hub lists is there with the listed size and, where the hub gives one,
the listed checksum (ModelScope: sha256; Hugging Face: sha256 of LFS files, the git blob sha1 of the
others); the folder has what FunASR loads (a config, a weights file, the files
`configuration.json` names); and, with `load`, FunASR loads it on CPU.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from speech_serve.replicas.models import ModelRole, ModelSource, hub_models, load_automodel
from speech_serve.settings import ModelSettings

WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".onnx")
CONFIG_FILES = ("config.yaml", "configuration.json")
HASH_CHUNK_BYTES = 1 << 20


class FetchError(RuntimeError):
    """A model could not be fetched or failed verification; the message names the model and the hub."""


@dataclass(frozen=True)
class HubFile:
    path: str
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None  # a git blob id: sha1 of b"blob <size>\0" + content


class Hub(Protocol):
    name: str
    endpoint: str

    def files(self, model_id: str) -> list[HubFile]: ...
    def download(self, model_id: str, target: Path) -> None: ...


class ModelScopeHub:
    name = "ModelScope"

    def __init__(self, endpoint: str | None = None) -> None:
        from modelscope_hub import HubApi

        self._api = HubApi(endpoint=endpoint)
        self.endpoint = self._api._config.endpoint

    def files(self, model_id: str) -> list[HubFile]:
        return [HubFile(f.path, f.size, f.sha256) for f in self._api.list_repo_files(model_id, "model")
                if f.type != "tree"]  # fmt: skip

    def download(self, model_id: str, target: Path) -> None:
        from modelscope import snapshot_download

        snapshot_download(model_id, local_dir=str(target), endpoint=self.endpoint)  # shows its own progress bars


class HuggingFaceHub:
    name = "Hugging Face"

    def __init__(self, endpoint: str | None = None) -> None:
        from huggingface_hub import HfApi, constants

        self.endpoint = endpoint or constants.ENDPOINT  # HF_ENDPOINT, or huggingface.co
        self._api = HfApi(endpoint=self.endpoint)

    def files(self, model_id: str) -> list[HubFile]:
        siblings = self._api.model_info(model_id, files_metadata=True).siblings or []
        return [HubFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, None if s.lfs else s.blob_id)
                for s in siblings]  # fmt: skip

    def download(self, model_id: str, target: Path) -> None:
        from huggingface_hub import snapshot_download

        snapshot_download(model_id, local_dir=str(target), endpoint=self.endpoint)  # shows its own progress bars


HUBS: dict[str, Callable[[str | None], Hub]] = {"ms": ModelScopeHub, "hf": HuggingFaceHub}


def fetch_target(cache: Path, hub_id: str) -> Path:
    """Where a fetched model goes: the first folder `hub_cache_candidates` names."""
    return cache / "models" / hub_id


def file_problems(folder: Path, listed: list[HubFile]) -> list[str]:
    """What differs from the hub's list: missing files, sizes, checksums."""
    problems = []
    for entry in listed:
        path = folder / entry.path
        if not path.is_file():
            problems.append(f"{entry.path}: missing")
            continue
        size = path.stat().st_size
        if entry.size is not None and size != entry.size:
            problems.append(f"{entry.path}: {size} bytes, the hub lists {entry.size}")
        elif entry.sha256 and digest(path, hashlib.sha256()) != entry.sha256.lower():
            problems.append(f"{entry.path}: sha256 differs from the hub's")
        elif entry.git_sha1 and digest(path, hashlib.sha1(f"blob {size}\0".encode())) != entry.git_sha1.lower():
            problems.append(f"{entry.path}: git blob id differs from the hub's")
    return problems


def digest(path: Path, hasher: Any) -> str:  # a hashlib object
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def layout_problems(folder: Path) -> list[str]:
    """What FunASR needs that the folder lacks: a config, a weights file, the files configuration.json names."""
    problems = []
    if not any((folder / name).is_file() for name in CONFIG_FILES):
        problems.append(f"neither {' nor '.join(CONFIG_FILES)}")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.rglob("*") if p.is_file()):
        problems.append(f"no weights file ({', '.join(WEIGHT_SUFFIXES)})")
    meta = folder / "configuration.json"
    if meta.is_file():
        try:
            named = json.loads(meta.read_text()).get("file_path_metas") or {}
        except (json.JSONDecodeError, AttributeError) as exc:
            return [*problems, f"configuration.json is not a JSON object: {exc}"]
        problems += [f"configuration.json names {key}: {value}, which is missing" for key, value in named.items()
                     if isinstance(value, str) and not (folder / value).exists()]  # fmt: skip
    return problems


def fetch_one(hub: Hub, role: ModelRole, hub_id: str, cache: Path, load: bool, say: Callable[[str], None]) -> Path:
    """Download one model (the hub client skips files it already has) and verify it."""
    what = f"{role} model {hub_id!r}"
    try:
        listed = hub.files(hub_id)
    except Exception as exc:  # the clients raise their own types (requests, httpx, their HTTP errors)
        raise FetchError(f"{what}: the {hub.name} hub at {hub.endpoint} cannot list it: {exc}") from exc
    total = sum(f.size or 0 for f in listed)
    target = fetch_target(cache, hub_id)
    say(f"{what}: {len(listed)} files, {total / 2**20:.1f} MiB from {hub.endpoint} -> {target}")
    try:
        hub.download(hub_id, target)
    except Exception as exc:
        raise FetchError(f"{what}: downloading from the {hub.name} hub at {hub.endpoint} failed: {exc}") from exc
    problems = file_problems(target, listed) + layout_problems(target)
    if problems:
        raise FetchError(f"{what} in {target} failed verification: " + "; ".join(problems))
    checked = sum(1 for f in listed if f.sha256 or f.git_sha1)
    say(f"{what}: verified ({len(listed)} files present with their sizes, {checked} checksums match)")
    if load:
        load_or_fail(role, what, target, say)
    return target


def load_or_fail(role: ModelRole, what: str, folder: Path, say: Callable[[str], None]) -> None:
    try:
        load_automodel(ModelSource(role, "local", str(folder)), "cpu", 1)
    except Exception as exc:  # whatever FunASR raises for a bad model
        raise FetchError(f"{what} in {folder} does not load in FunASR: {exc}") from exc
    say(f"{what}: loads in FunASR")


def fetch_models(settings: ModelSettings, cache: Path, hub: Hub, load: bool = False,
                 say: Callable[[str], None] = print) -> dict[ModelRole, Path]:  # fmt: skip
    """Fetch every hub model of the settings (a model with an explicit `path` is only verified there)."""
    fetched: dict[ModelRole, Path] = {}
    for role, spec in hub_models(settings).items():
        if spec.path is not None:
            folder = Path(spec.path).expanduser()
            problems = layout_problems(folder) if folder.is_dir() else ["not a directory"]
            if problems:
                raise FetchError(f"{role} model at models.{role}.path={spec.path}: " + "; ".join(problems))
            say(f"{role} model: models.{role}.path={folder}, not fetched (set explicitly); its layout is complete")
            if load:
                load_or_fail(role, f"models.{role}.path={spec.path}", folder, say)
            fetched[role] = folder
            continue
        fetched[role] = fetch_one(hub, role, spec.hub_id, cache, load, say)
    return fetched

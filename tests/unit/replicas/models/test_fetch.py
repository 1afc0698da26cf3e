"""`speech-serve models fetch` against a local Hugging Face hub (tests/support/fake_hub.py): download, verify,
and clear errors naming the model and the hub (speech_serve/replicas/models/fetch.py).

Not covered here: ModelScope's own download protocol (its client, modelscope_hub, speaks an API this
repository does not fake); its adapter is covered through a stand-in client, and its unreachable error."""

import json
import shutil
import socket
from pathlib import Path

import pytest

from speech_serve.replicas.models import bundled_vad_dir, resolve_models
from speech_serve.replicas.models.fetch import FetchError, HubFile, HuggingFaceHub, ModelScopeHub, fetch_models
from speech_serve.settings import ModelSettings, ModelSpec
from tests.support.fake_hub import FakeHub

ROOT = Path(__file__).parents[4]
IDS = {"vad": "iic/speech_fsmn_vad_zh-cn-16k-common-pytorch", "asr": "iic/SenseVoiceSmall",
       "speaker": "iic/speech_campplus_sv_zh-cn_16k-common"}  # fmt: skip


def model_folder(root, name, weights=b"w" * 4096):
    """A small model folder shaped like the hub's: config, configuration.json naming its files, weights."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: Fake\n")
    (folder / "model.pt").write_bytes(weights)
    (folder / "am.mvn").write_text("<Nnet>\n")
    (folder / "configuration.json").write_text(json.dumps({"file_path_metas": {"init_param": "model.pt",
                                                                                "cmvn_file": "am.mvn"}}))  # fmt: skip
    return folder


@pytest.fixture
def hub(tmp_path):
    served = tmp_path / "served"
    vad = served / "vad"
    shutil.copytree(bundled_vad_dir(), vad)  # the real fsmn-vad: it also loads (test_a_fetched_vad_loads)
    models = {IDS["vad"]: vad, IDS["asr"]: model_folder(served, "asr"), IDS["speaker"]: model_folder(served, "spk")}
    fake = FakeHub(models)
    yield fake
    fake.close()


def test_fetch_downloads_and_verifies_every_model_where_the_service_then_finds_it(hub, tmp_path, monkeypatch):
    cache, lines = tmp_path / "cache", []
    fetched = fetch_models(ModelSettings(hub="hf"), cache, HuggingFaceHub(hub.endpoint), say=lines.append)
    assert fetched == {role: cache / "models" / hub_id for role, hub_id in IDS.items()}
    assert (fetched["asr"] / "model.pt").read_bytes() == b"w" * 4096
    assert any(line.startswith("asr model 'iic/SenseVoiceSmall': 4 files") for line in lines)
    assert any("verified (4 files present with their sizes, 4 checksums match)" in line for line in lines)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))  # the service's resolution, offline, finds them
    resolved = resolve_models(ModelSettings(require_real_models=True), hub_up=False)
    assert {s.role: (s.kind, s.ref) for s in (resolved.vad, resolved.asr, resolved.speaker)} == {
        role: ("local", str(path)) for role, path in fetched.items()}


def test_a_corrupted_download_fails_verification_naming_the_file(tmp_path):
    fake = FakeHub({IDS["asr"]: model_folder(tmp_path / "served", "asr")}, corrupt=frozenset({"model.pt"}))
    try:
        settings = ModelSettings(hub="hf", vad=ModelSpec(hub_id="x", path=str(bundled_vad_dir())),
                                 speaker_backend="ge2e")  # fmt: skip
        with pytest.raises(FetchError, match=r"asr model 'iic/SenseVoiceSmall' in .* failed verification: "
                                             r"model.pt: sha256 differs from the hub's"):  # fmt: skip
            fetch_models(settings, tmp_path / "cache", HuggingFaceHub(fake.endpoint), say=lambda _: None)
    finally:
        fake.close()


def test_an_unknown_model_and_an_unreachable_hub_are_named(hub, tmp_path):
    settings = ModelSettings(hub="hf", asr=ModelSpec(hub_id="nobody/NoSuchModel"))
    with pytest.raises(FetchError, match=rf"asr model 'nobody/NoSuchModel': the Hugging Face hub at {hub.endpoint}"):
        fetch_models(settings, tmp_path / "cache", HuggingFaceHub(hub.endpoint), say=lambda _: None)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(FetchError, match=rf"vad model '{IDS['vad']}': the Hugging Face hub at {closed} cannot"):
        fetch_models(ModelSettings(hub="hf"), tmp_path / "cache", HuggingFaceHub(closed), say=lambda _: None)


def test_an_explicit_path_is_checked_not_fetched_and_an_incomplete_one_is_refused(tmp_path):
    complete = model_folder(tmp_path, "sv")
    settings = ModelSettings(vad=ModelSpec(hub_id="x", path=str(bundled_vad_dir())),
                             asr=ModelSpec(hub_id="y", path=str(complete)), speaker_backend="ge2e")  # fmt: skip
    assert fetch_models(settings, tmp_path / "cache", hub=None, say=lambda _: None) == {
        "vad": bundled_vad_dir(), "asr": complete}
    (complete / "am.mvn").unlink()
    with pytest.raises(FetchError, match="models.asr.path=.*configuration.json names cmvn_file: am.mvn, which is"):
        fetch_models(settings, tmp_path / "cache", hub=None, say=lambda _: None)


class StandInModelScope(ModelScopeHub):
    """ModelScope's adapter with its client's two calls answered locally (its wire protocol is not faked)."""

    def __init__(self, folder, sha256):
        self.endpoint, self._folder, self._sha256 = "https://www.modelscope.cn", folder, sha256

    def files(self, model_id):
        return [HubFile(p.name, p.stat().st_size, self._sha256 if p.name == "model.pt" else None)
                for p in self._folder.iterdir()]

    def download(self, model_id, target):
        shutil.copytree(self._folder, target, dirs_exist_ok=True)


def test_modelscope_checksums_are_verified(tmp_path):
    import hashlib

    folder = model_folder(tmp_path / "served", "asr")
    settings = ModelSettings(vad=ModelSpec(hub_id="x", path=str(bundled_vad_dir())), speaker_backend="ge2e")
    good = hashlib.sha256((folder / "model.pt").read_bytes()).hexdigest()
    fetch_models(settings, tmp_path / "a", StandInModelScope(folder, good), say=lambda _: None)
    with pytest.raises(FetchError, match="model.pt: sha256 differs"):
        fetch_models(settings, tmp_path / "b", StandInModelScope(folder, "0" * 64), say=lambda _: None)


def test_a_fetched_vad_loads_in_funasr(hub, tmp_path):
    settings = ModelSettings(hub="hf", asr=ModelSpec(hub_id="x", path=str(model_folder(tmp_path, "sv"))),
                             speaker_backend="ge2e")  # fmt: skip
    lines = []
    with pytest.raises(FetchError, match="models.asr.path=.* does not load in FunASR"):  # a fake SenseVoice folder
        fetch_models(settings, tmp_path / "cache", HuggingFaceHub(hub.endpoint), load=True, say=lines.append)
    assert f"vad model '{IDS['vad']}': loads in FunASR" in lines  # the real fsmn-vad, fetched then loaded


def test_the_real_modelscope_client_unreachable_is_named(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(FetchError, match=rf"vad model '{IDS['vad']}': the ModelScope hub at {closed} cannot list"):
        fetch_models(ModelSettings(), tmp_path / "cache", ModelScopeHub(closed), say=lambda _: None)


def test_the_command_fetches_what_a_config_names(hub, tmp_path, capsys):
    from speech_serve.cli.models import main

    def config(models: str):
        path = tmp_path / f"{len(list(tmp_path.glob('*.yaml')))}.yaml"
        path.write_text(f"base: {ROOT / 'config' / 'production.yaml'}\n"
                        f"applications:\n  - name: speech\n    args: {{models: {models}}}\n")  # fmt: skip
        return str(path)

    cache = str(tmp_path / "c")
    main(["fetch", "--config", config("{hub: hf}"), "--endpoint", hub.endpoint, "--cache-dir", cache])
    assert capsys.readouterr().out.count("verified") == 3
    assert (tmp_path / "c" / "models" / IDS["speaker"] / "model.pt").exists()
    with pytest.raises(SystemExit, match="models fetch: asr model 'nobody/x': the Hugging Face hub at"):
        main(["fetch", "--config", config("{hub: hf, asr: {hub_id: nobody/x}}"), "--endpoint", hub.endpoint,
              "--cache-dir", cache])  # fmt: skip

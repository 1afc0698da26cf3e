"""`speech-serve check`: a config or an overlay validated (merged first), errors with their YAML path, the
effective settings printed with secrets redacted (speech_serve/cli/check.py)."""

from pathlib import Path

import pytest
import yaml

from speech_serve.cli.check import main

ROOT = Path(__file__).parents[3]
SHIPPED = sorted((ROOT / "config").glob("*.yaml")) + [ROOT / "deploy" / "kuberay" / "overlay.yaml"]


def overlay(tmp_path: Path, text: str) -> str:
    path = tmp_path / "overlay.yaml"
    path.write_text(f"base: {ROOT / 'config' / 'serve.yaml'}\n{text}")
    return str(path)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_the_shipped_config_and_every_shipped_overlay_pass(path, capsys):
    assert main(["-q", str(path)]) == 0
    assert capsys.readouterr().err.strip().endswith(f"{path}: OK")


def test_the_production_profile_prints_its_effective_settings_merged_with_defaults(capsys):
    assert main([str(ROOT / "config" / "production.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# the effective configuration of") and "(merged onto its base)" in out
    config = yaml.safe_load(out)
    (app,) = config["applications"]
    assert config["http_options"]["host"] == "0.0.0.0" and app["args"]["security"]["device_auth"] == "on"
    assert app["args"]["models"]["require_real_models"] is True and app["args"]["logging"]["encoding"] == "JSON"
    assert app["args"]["asr"]["dither"] == 0.0  # a default filled in
    assert app["args"]["security"]["device_secret_env"] == "SPEECH_SERVE_DEVICE_SECRET"  # a name: shown


def test_a_bad_key_and_a_bad_value_fail_naming_their_yaml_path(tmp_path, capsys):
    path = overlay(tmp_path, """\
http_options: {hots: 0.0.0.0}
applications:
  - name: speech
    args:
      models: {hub: github, allow_test_model: false}
    deployments:
      - name: VADHost
        max_ongoing_requestz: 3
        autoscaling_config: {min_replicas: lots}
      - name: Ingres
""")
    assert main([path]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # no effective settings from an invalid file
    for line in ("http_options.hots: unknown key (did you mean 'host'?)",
                 "applications[speech].args.models.allow_test_model: unknown key (did you mean 'allow_test_models'?)",
                 "applications[speech].args.models.hub: Input should be 'ms' or 'hf'",
                 "applications[speech].deployments[VADHost].max_ongoing_requestz: unknown key",
                 "applications[speech].deployments[VADHost].autoscaling_config.min_replicas: Input should be a valid",
                 "applications[speech].deployments[Ingres]: not a deployment of this app"):  # fmt: skip
        assert f"error: {line}" in captured.err, line
    assert "lots" not in captured.err and "6 error(s)" in captured.err  # values are never echoed


def test_secrets_written_in_the_file_are_warned_about_and_never_printed(tmp_path, capsys):
    path = overlay(tmp_path, """\
applications:
  - name: speech
    runtime_env: {env_vars: {SPEECH_SERVE_DEVICE_SECRET: s3cret-s3cret-s3cret}}
    args:
      voiceprints: {store: "postgresql://speech:hunter2-hunter2@db.lan/speech"}
""")
    assert main([path]) == 0
    captured = capsys.readouterr()
    assert "s3cret" not in captured.out + captured.err and "hunter2" not in captured.out + captured.err
    assert "postgresql://speech:<redacted>@db.lan/speech" in captured.out
    assert "runtime_env.env_vars.SPEECH_SERVE_DEVICE_SECRET: a secret in the file" in captured.err
    assert "args.voiceprints.store: a secret in the file" in captured.err


def test_an_unreadable_file_fails_with_the_reason(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications: [\n")
    assert main([str(broken)]) == 1 and "cannot read" in capsys.readouterr().err
    assert main([str(tmp_path / "absent.yaml")]) == 1 and "No such file" in capsys.readouterr().err

"""The image: what deploy/kuberay/Dockerfile puts in, what .dockerignore keeps out, and how
speech_serve/cli/image.py picks a builder (or says why none works)."""

import fnmatch
import stat
from pathlib import Path

import pytest
import yaml

from speech_serve.cli.image import DOCKERFILE, ROOT, find_builder

HEAVY = [".git", ".venv", "loadtest/results", "loadtest/corpus", "tests", ".pytest_cache", ".ruff_cache",
         "speech_serve/__pycache__", "speech_serve.egg-info"]  # fmt: skip
NEEDED = ["pyproject.toml", "speech_serve", "speech_serve/app.py", "config", "config/serve.yaml", "config/serve.env"]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, enough for these patterns: a pattern matches the path or one of its parent folders."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/"))
               or fnmatch.fnmatch(parts[i], pattern.removeprefix("**/"))
               for pattern in patterns for i, p in enumerate(prefixes))  # fmt: skip


def test_the_dockerfile_installs_the_package_and_copies_config_and_serves_the_production_profile():
    steps = [line.split() for line in DOCKERFILE.read_text().splitlines() if line and not line.startswith("#")]
    copies = [step[-2:] for step in steps if step[0] == "COPY"]
    assert ["config", "config"] in copies and ["speech_serve", "speech_serve"] in copies
    install = next(i for i, step in enumerate(steps) if step[0] == "RUN" and "install" in step)
    assert steps.index(next(s for s in steps if s[0] == "COPY" and s[-1] == "config")) > install  # config: a thin layer
    cmd = next(" ".join(step) for step in steps if step[0] == "CMD")
    assert "config/production.yaml" in cmd and "config/serve.env" in cmd
    models = yaml.safe_load((ROOT / "deploy" / "kuberay" / "cluster.yaml").read_text())["models"]["mount"]
    assert ["ENV", f"MODELSCOPE_CACHE={models}"] in steps  # the volume KubeRay mounts, the same for one host


def test_dockerignore_keeps_the_heavy_folders_out_and_what_the_image_needs_in():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    assert not [path for path in HEAVY if not ignored(path, patterns)]
    assert not [path for path in NEEDED if ignored(path, patterns)]
    assert not any(p.startswith("!") for p in patterns)  # no re-includes: the rule above stays the whole rule


def fake_tool(folder: Path, name: str, code: int, stderr: str = "") -> None:
    tool = folder / name
    tool.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit {code}\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)


def test_a_docker_client_without_an_engine_is_named_and_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    fake_tool(tmp_path, "docker", 1, "Cannot connect to the Docker daemon at unix:///var/run/docker.sock. Is the "
                                     "docker daemon running?")  # fmt: skip
    builder = find_builder()
    assert builder.name is None
    assert builder.reason == ("docker client found but no engine (Cannot connect to the Docker daemon at "
                              "unix:///var/run/docker.sock. Is the docker daemon running?); podman not installed; "
                              "buildah not installed")  # fmt: skip
    with pytest.raises(RuntimeError, match="no container builder works here: docker client found but no engine"):
        builder.build_command("x")
    fake_tool(tmp_path, "buildah", 0)
    builder = find_builder()
    assert builder.name == "buildah"
    assert builder.build_command("speech-serve:t") == ["buildah", "build", "-f", str(DOCKERFILE), "-t",
                                                       "speech-serve:t", str(ROOT)]  # fmt: skip


def test_the_command_fails_saying_why_when_no_builder_works(tmp_path, monkeypatch, capsys):
    from speech_serve.cli.image import main

    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["--which"]) == 1
    assert "no container builder works here: docker not installed; podman not installed; buildah not installed" in (
        capsys.readouterr().err)

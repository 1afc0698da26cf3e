"""The image: what deploy/kuberay/Dockerfile puts in, what .dockerignore keeps out, and how
speech_serve/cli/image.py picks a builder (or says why none works)."""

import fnmatch
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from speech_serve.cli.image import DOCKERFILE, ROOT, Builder, find_builder

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


def test_what_the_dockerfile_copies_from_the_context_is_enough_to_check_the_shipped_configs(tmp_path):
    """The image without an engine: its COPY steps replayed from the build context (the files
    .dockerignore keeps) into a folder, and the package imported from there alone runs the check the
    built image runs (tests/integration/test_image.py) on both configs."""
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]  # fmt: skip
    steps = [line.split() for line in DOCKERFILE.read_text().splitlines() if line and not line.startswith("#")]
    for source, target in (step[-2:] for step in steps if step[0] == "COPY"):
        for path in [ROOT / source] if (ROOT / source).is_file() else sorted((ROOT / source).rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and not ignored(rel, patterns):
                dest = tmp_path / (target.rstrip("/") + rel.removeprefix(source) if target not in ("./", ".") else rel)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(path.read_bytes())
    assert not list(tmp_path.rglob("__pycache__"))  # the context left them out
    configs = ["config/serve.yaml", "config/production.yaml"]
    check = ("import sys, speech_serve; assert speech_serve.__file__.startswith(sys.argv[1]); "
             "from speech_serve.cli import main; sys.exit(max([main(['check', '-q', c]) for c in sys.argv[2:]]))")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the copied package, not this checkout's
    result = subprocess.run([sys.executable, "-c", check, str(tmp_path), *configs], cwd=tmp_path, env=env,
                            capture_output=True, text=True)  # one process: the import is most of its time
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(f"{config}: OK" in result.stderr for config in configs), result.stderr[-2000:]


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


def test_buildah_runs_a_command_in_a_working_container_it_then_removes(tmp_path, monkeypatch):
    """buildah has no `run IMAGE`: from, run, rm, with the command's exit status."""
    log = tmp_path / "calls"
    tool = tmp_path / "buildah"
    tool.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = from ] && echo box-1\n[ "$1" = run ] && exit 3\nexit 0\n')
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    command = Builder("buildah", "buildah works").run_command("speech-serve:t", "sh", "-c", "echo hi")
    assert subprocess.run(command).returncode == 3
    assert log.read_text().splitlines() == ["from speech-serve:t", "run box-1 -- sh -c echo hi", "rm box-1"]
    assert Builder("docker", "").run_command("t", "true") == ["docker", "run", "--rm", "t", "true"]


def test_the_command_fails_saying_why_when_no_builder_works(tmp_path, monkeypatch, capsys):
    from speech_serve.cli.image import main

    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["--which"]) == 1
    assert "no container builder works here: docker not installed; podman not installed; buildah not installed" in (
        capsys.readouterr().err)

"""Build the service's container image with whichever builder works here: docker, podman or buildah.

    speech-serve image                       # (`make image`) speech-serve:<version> from deploy/kuberay/Dockerfile
    speech-serve image --tag registry.lan/speech-serve:0.1.0
    speech-serve image --which               # only say which builder would build, or why none can

A builder counts only if it can build now: a docker client needs a reachable engine, podman and
buildah must answer `info`. Without one, the command exits 1 saying what it found for each.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "kuberay" / "Dockerfile"
PROBE_TIMEOUT_S = 20  # `docker info` against a remote engine can take a few seconds
# builder -> (its probe, its build command before -f/-t/context)
BUILDERS = {
    "docker": (["docker", "info"], ["docker", "build"]),
    "podman": (["podman", "info"], ["podman", "build"]),
    "buildah": (["buildah", "info"], ["buildah", "build"]),
}


@dataclass(frozen=True)
class Builder:
    name: str | None  # None: no builder works here
    reason: str  # what was found, for each builder

    def build_command(self, tag: str, dockerfile: Path = DOCKERFILE, context: Path = ROOT) -> list[str]:
        if self.name is None:
            raise RuntimeError(f"no container builder works here: {self.reason}")
        return [*BUILDERS[self.name][1], "-f", str(dockerfile), "-t", tag, str(context)]

    def run_command(self, tag: str, *command: str) -> list[str]:
        """Run a command in the image and remove the container; its exit status is the command's."""
        if self.name is None:
            raise RuntimeError(f"no container builder works here: {self.reason}")
        if self.name == "buildah":  # no `run IMAGE`: a working container from the image, run in, then removed
            script = ('c=$(buildah from "$1") && shift && '
                      '{ buildah run "$c" -- "$@"; s=$?; buildah rm "$c" >/dev/null; exit $s; }')
            return ["sh", "-c", script, "sh", tag, *command]
        return [self.name, "run", "--rm", tag, *command]


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return next((line for line in lines if "error" in line.lower() or "cannot" in line.lower()), lines[0] if lines
                else "no output")  # fmt: skip


def find_builder() -> Builder:
    """The first builder that can build now, and for each one tried, why it cannot."""
    found = []
    for name, (probe, _) in BUILDERS.items():
        if shutil.which(probe[0]) is None:
            found.append(f"{name} not installed")
            continue
        try:
            result = subprocess.run(probe, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            found.append(f"{name} found but `{' '.join(probe)}` did not answer in {PROBE_TIMEOUT_S} s")
            continue
        if result.returncode == 0:
            return Builder(name, "; ".join([*found, f"{name} works"]))
        what = "client found but no engine" if name == "docker" else "found but not usable"
        found.append(f"{name} {what} ({first_line(result.stderr or result.stdout)})")
    return Builder(None, "; ".join(found))


def default_tag() -> str:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return f"speech-serve:{version}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speech-serve image", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--tag", default=default_tag())
    parser.add_argument("--which", action="store_true", help="only say which builder would build")
    args = parser.parse_args(argv)
    builder = find_builder()
    if builder.name is None:
        print(f"no container builder works here: {builder.reason}", file=sys.stderr)
        return 1
    print(f"builder: {builder.name} ({builder.reason})", flush=True)
    if args.which:
        return 0
    command = builder.build_command(args.tag)
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())

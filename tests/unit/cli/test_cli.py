"""One entry point for the operator's commands (`speech-serve`, cli/__init__.py)."""

import importlib
import tomllib
from pathlib import Path

from speech_serve.cli import COMMANDS, main


def test_every_command_runs_a_modules_main_and_the_entry_point_is_installed():
    for module in COMMANDS.values():
        assert callable(importlib.import_module(module).main), module
    scripts = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"speech-serve": "speech_serve.cli:main"}


def test_help_lists_the_commands_and_an_unknown_one_is_refused(capsys):
    assert main([]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {name} " in listing for name in COMMANDS) and "Config profiles as overlays" in listing
    assert main(["nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err


def test_a_command_gets_its_own_arguments(capsys):
    assert main(["reference", "--check"]) == 0
    assert "docs/configuration.md is up to date" in capsys.readouterr().out

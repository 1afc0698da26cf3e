"""The operator's commands, one entry point: `speech-serve <command> [options]` (`pip install .`
installs it; `python -m speech_serve.cli.<module>` runs the same)."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

# command -> the module whose main(argv) runs it
COMMANDS = {
    "host": "speech_serve.cli.host",
    "plan": "speech_serve.cli.plan",
    "transport": "speech_serve.cli.transport",
    "profile": "speech_serve.cli.profile",
    "check": "speech_serve.cli.check",
    "reference": "speech_serve.cli.reference",
    "scale": "speech_serve.cli.scale",
    "kuberay": "speech_serve.cli.kuberay",
    "image": "speech_serve.cli.image",
    "models": "speech_serve.cli.models",
    "token": "speech_serve.cli.tokens",
    "loadgen": "speech_serve.loadtest.loadgen",
    "sweep": "speech_serve.loadtest.sweep",
    "soak": "speech_serve.loadtest.soak",
    "bench": "speech_serve.loadtest.bench_pipeline",
    "bench-vad": "speech_serve.loadtest.bench_vad",
    "bench-decode": "speech_serve.loadtest.bench_decode",
}


def summary(module: str) -> str:
    """A command module's docstring, up to its first full stop or colon, read without importing it
    (the load tools import torch)."""
    doc = ast.get_docstring(ast.parse(Path(importlib.util.find_spec(module).origin).read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    ends = [i for i in (first.find(". "), first.find(": "), len(first)) if i >= 0]
    return first[: min(ends)].rstrip(".")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {summary(module)}" for name, module in COMMANDS.items()]
        print("usage: speech-serve <command> [options]   (speech-serve <command> --help)\n\n" + "\n".join(lines))
        if args and args[0] not in ("-h", "--help"):
            print(f"\nunknown command {args[0]!r}", file=sys.stderr)
            return 2
        return 0
    result = importlib.import_module(COMMANDS[args[0]]).main(args[1:])
    return result if isinstance(result, int) else 0

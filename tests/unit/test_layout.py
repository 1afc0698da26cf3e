"""The shape of the code, kept: files and settings classes a reader can take in, protocols that do not
lean on one another, no import circles, tests that mirror the code and share fakes only through
tests/support/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "speech_serve"
TESTS = ROOT / "tests"
MAX_LINES = 400  # the service's modules (the load tools in speech_serve/loadtest/ are tools, not the service)
MAX_SETTINGS_CLASS_LINES = 80
MIRRORED_ABOVE = 100  # a module longer than this has a test module named after it


def modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module this file imports, wherever the import statement stands (a function-local import
    makes a circle too). `from a.b import c` counts as `a.b.c` when that is a module, else `a.b`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in KNOWN else node.module)
    return found


KNOWN = {module_name(p) for p in modules(PACKAGE) + modules(TESTS)}


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_service_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): lines(p) for p in modules(PACKAGE) if "loadtest" not in p.parts}
    assert not {p: n for p, n in long.items() if n > MAX_LINES}


def test_no_settings_class_is_over_80_lines():
    sizes = {f"{p.name}:{n.name}": n.end_lineno - n.lineno + 1 for p in modules(PACKAGE / "settings")
             for n in ast.parse(p.read_text()).body if isinstance(n, ast.ClassDef)}  # fmt: skip
    assert sizes and not {c: n for c, n in sizes.items() if n > MAX_SETTINGS_CLASS_LINES}


def protocol_of(module: str) -> str | None:
    """`speech_serve.ingress.protocols.<protocol>[.<part>]`; parsing (their shared helpers) is none."""
    prefix = "speech_serve.ingress.protocols."
    if not module.startswith(prefix):
        return None
    name = module.removeprefix(prefix).split(".")[0]
    return None if name == "parsing" else name


def test_no_protocol_module_imports_another():
    leaning = {}
    for path in modules(PACKAGE / "ingress" / "protocols"):
        mine = protocol_of(module_name(path))
        others = {m for m in imports_of(path) if protocol_of(m) not in (None, mine)}
        if mine and others:
            leaning[module_name(path)] = others
    assert not leaning


def import_graph(paths: list[Path]) -> dict[str, set[str]]:
    return {module_name(p): {m for m in imports_of(p) if m in KNOWN} for p in paths}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    return found


def test_there_is_no_import_circle():
    assert circles(import_graph(modules(PACKAGE))) == []


def test_the_circle_finder_finds_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_test_module_imports_another():
    leaning = {}
    for path in modules(TESTS):
        tests_imported = {m for m in imports_of(path) if m.startswith("tests.") and not m.startswith("tests.support")}
        if tests_imported:
            leaning[str(path.relative_to(ROOT))] = tests_imported
    assert not leaning


def mirror_of(path: Path) -> list[Path]:
    """Where a module's tests live: tests/unit/<its folders>/test_<name>.py (a package's __init__:
    test_<package>.py beside the package or in it), or tests/integration/test_<name>.py."""
    rel = path.relative_to(PACKAGE)
    folders, name = (rel.parts[:-2], rel.parts[-2]) if rel.name == "__init__.py" else (rel.parts[:-1], rel.stem)
    unit = TESTS / "unit" / Path(*folders)
    return [unit / f"test_{name}.py", unit / name / f"test_{name}.py", TESTS / "integration" / f"test_{name}.py"]


@pytest.mark.parametrize(
    "path", [p for p in modules(PACKAGE) if lines(p) > MIRRORED_ABOVE], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_every_module_over_100_lines_has_its_test_module(path):
    assert any(t.exists() for t in mirror_of(path)), f"no {mirror_of(path)[0].relative_to(ROOT)}"


def test_the_readme_is_a_guide_not_a_notebook():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 350
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", readme), "dated runs belong in docs/"
    assert not re.search(r"(?i)\bround\b", readme), "the history of the capacity work is docs/capacity.md"
    quick_start = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make serve" in quick_start and "make test" in quick_start


def test_code_and_config_cite_no_notebook():
    """They may point at a guide page, never at the README or at the history's rounds."""
    citing = {}
    for path in [*modules(PACKAGE), *sorted((ROOT / "config").rglob("*.yaml")), ROOT / "config" / "serve.env"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"README|docs/capacity\.md|(?i:\b(first|second|third|fourth|fifth|sixth|seventh|eighth)"
                         r" round\b)", line):  # fmt: skip
                citing[f"{path.relative_to(ROOT)}:{n}"] = line.strip()
    assert not citing

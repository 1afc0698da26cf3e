"""Validate a config or a profile overlay before it is deployed, and print what it gives.

    speech-serve check config/production.yaml      # exit 1 on any error; the effective settings on stdout

An overlay (a file with `base:`) is merged onto its base first, as `speech-serve profile` does. Errors
name the YAML path (`applications[0].args.models.hub`): unknown keys (with the closest known one),
bad values (never echoed: they may be secrets), deployments the app does not have. Serve itself
ignores unknown keys in a deployment's options; here they are errors. The effective configuration
(every default filled in) goes to stdout with secret-looking values redacted; a secret-looking value
written in the file is a warning: secrets belong in the environment.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from speech_serve.cli.profile import effective, load

OUR_APP = "speech_serve.app:build_app"
# Names of keys whose string values are secrets. `*_env` keys hold a variable's NAME and are shown.
SECRET_KEY = re.compile(r"(?i)secret|token|password|passwd|credential|api_?key|private")
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/:@\s]+:)[^@/\s]+(?=@)")
REDACTED = "<redacted>"


def yaml_path(loc: tuple[Any, ...] | list[Any], data: Any = None, prefix: str = "") -> str:
    """A pydantic location as a YAML path: ("applications", 0, "args") -> applications[speech].args. A list
    item that has a `name` is shown by it: overlays merge such lists by name, so indices would mislead."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            item = data[part] if isinstance(data, list) and part < len(data) else None
            out += f"[{item['name']}]" if isinstance(item, dict) and "name" in item else f"[{part}]"
            data = item
        else:
            out += f".{part}" if out else str(part)
            data = data.get(part) if isinstance(data, dict) else None
    return out or "(top level)"


def _item(path: str, index: int, item: Any) -> str:
    return f"{path}[{item['name']}]" if isinstance(item, dict) and "name" in item else f"{path}[{index}]"


def _nested(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """The settings models a field holds, and how: "one", "list" (of them) or "map" (of them)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "one")]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _nested(args[0])
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in _nested(arg)]
    if origin is list and args:
        return [(model, "list") for model, how in _nested(args[0]) if how == "one"]
    if origin is dict and len(args) == 2:
        return [(model, "map") for model, how in _nested(args[1]) if how == "one"]
    return []


def unknown_keys(model: type[BaseModel], data: Any, path: str) -> list[str]:
    """Keys the model has no field for, anywhere below `data` (Serve's own schema ignores them silently), and
    the values of fields Serve types as "a dict or a model" (it checks those only when it deploys)."""
    if not isinstance(data, dict):
        return []
    fields = {f.alias or name: f for name, f in model.model_fields.items()} | dict(model.model_fields)
    errors = []
    for key, value in data.items():
        here = f"{path}.{key}" if path else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            errors.append(f"{here}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        annotation = fields[key].annotation
        for inner, how in _nested(annotation):
            if how == "one" and isinstance(value, dict):
                errors += unknown_keys(inner, value, here)
                if _takes_a_plain_dict(annotation):
                    errors += bad_values(inner, value, here)
            elif how == "list" and isinstance(value, list):
                errors += [e for i, item in enumerate(value) for e in unknown_keys(inner, item, _item(here, i, item))]
            elif how == "map" and isinstance(value, dict):
                errors += [e for k, item in value.items() for e in unknown_keys(inner, item, f"{here}.{k}")]
    return errors


def _takes_a_plain_dict(annotation: Any) -> bool:
    return any(arg is dict or typing.get_origin(arg) is dict for arg in typing.get_args(annotation))


def bad_values(model: type[BaseModel], data: Any, prefix: str) -> list[str]:
    """The model's errors other than unknown keys (those come from `unknown_keys`, with a suggestion)."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return [f"{yaml_path(e['loc'], data, prefix)}: {e['msg']}" for e in exc.errors()
                if e["type"] != "extra_forbidden"]  # fmt: skip
    return []


def check(config: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(errors, warnings) of a merged config."""
    from ray.serve.schema import ServeDeploySchema

    from speech_serve.settings import DEFAULT_DEPLOYMENT_OPTIONS, AppSettings

    errors = unknown_keys(ServeDeploySchema, config, "") + bad_values(ServeDeploySchema, config, "")
    warnings = [f"{path}: a secret in the file: put it in the environment" for path in secrets_in(config)]
    for i, app in enumerate(config.get("applications") or []):
        if not isinstance(app, dict) or app.get("import_path") != OUR_APP:
            continue
        where = _item("applications", i, app)
        args = app.get("args") or {}
        errors += unknown_keys(AppSettings, args, f"{where}.args") + bad_values(AppSettings, args, f"{where}.args")
        for j, deployment in enumerate(app.get("deployments") or []):
            name = deployment.get("name") if isinstance(deployment, dict) else None
            if name not in DEFAULT_DEPLOYMENT_OPTIONS:
                errors.append(f"{_item(f'{where}.deployments', j, deployment)}: not a deployment of this app "
                              f"({', '.join(DEFAULT_DEPLOYMENT_OPTIONS)})")  # fmt: skip
        mine = (args.get("logging") or {}).get("encoding") if isinstance(args.get("logging"), dict) else None
        serve = (config.get("logging_config") or {}).get("encoding")
        if mine and serve and str(mine).upper() != str(serve).upper():
            warnings.append(f"{where}.args.logging.encoding is {mine} but logging_config.encoding is {serve}: "
                            "the replicas and Serve's controller and proxies would log differently")  # fmt: skip
    return errors, warnings


def secrets_in(value: Any, path: str = "") -> list[str]:
    """YAML paths of secret-looking values: a string under a secret-looking key, a URL with a password."""
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if isinstance(item, str) and item and SECRET_KEY.search(str(key)) and not str(key).endswith("_env"):
                found.append(here)
            else:
                found += secrets_in(item, here)
        return found
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in secrets_in(item, _item(path, i, item))]
    return [path] if isinstance(value, str) and URL_PASSWORD.search(value) else []


def redact(value: Any, key: str = "") -> Any:
    """The config with secret-looking values replaced (see `secrets_in`)."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        if value and SECRET_KEY.search(key) and not key.endswith("_env"):
            return REDACTED
        return URL_PASSWORD.sub(rf"\g<head>{REDACTED}", value)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="speech-serve check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("file", help="a config (config/serve.yaml) or a profile overlay (config/production.yaml)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only the verdict, not the effective settings")
    args = parser.parse_args(argv)
    try:
        config = load(args.file)
    except (OSError, yaml.YAMLError) as exc:  # a missing file or base, or a YAML syntax error (with its line)
        print(f"{args.file}: error: cannot read: {exc}", file=sys.stderr)
        return 1
    if not isinstance(config, dict):
        print(f"{args.file}: error: the top level must be a mapping", file=sys.stderr)
        return 1
    errors, warnings = check(config)
    for line in warnings:
        print(f"{args.file}: warning: {line}", file=sys.stderr)
    for line in errors:
        print(f"{args.file}: error: {line}", file=sys.stderr)
    if errors:
        print(f"{args.file}: {len(errors)} error(s)", file=sys.stderr)
        return 1
    if not args.quiet:
        merged = " (merged onto its base)" if "base" in (yaml.safe_load(Path(args.file).read_text()) or {}) else ""
        sys.stdout.write(f"# the effective configuration of {args.file}{merged}: defaults filled in, secrets "
                         f"redacted\n" + yaml.safe_dump(redact(effective(config)), sort_keys=False))  # fmt: skip
    print(f"{args.file}: OK", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

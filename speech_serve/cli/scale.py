"""Change a running application's scaling live, through the Ray dashboard's REST API.

    speech-serve scale SenseVoice --min 2 --max 8
    speech-serve scale SenseVoice --batch-size 16 --batch-wait-s 0.03
    speech-serve scale VADHost --sessions-per-replica 100   # vad.sessions_per_replica: redeploys
    speech-serve scale --show                      # what is deployed now

It reads the deployed config (GET /api/serve/applications/), changes the deployment's
`autoscaling_config` / `user_config`, and applies it with a PUT: Serve updates those in place,
without restarting replicas. `--sessions-per-replica` changes the app's `vad.sessions_per_replica`
instead (the Ingress's lanes and VADHost's policy follow it together): Serve redeploys the app.
Equivalent by hand: edit config/serve.yaml, `serve deploy config/serve.yaml`. Only works for
applications deployed from a config (`serve run config/serve.yaml` or `serve deploy`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from typing import Any

import httpx

from speech_serve.cli.dashboard import APPLICATIONS, DEFAULT_ADDRESS, auth_headers

CONFIG_KEYS = ("proxy_location", "http_options", "grpc_options", "target_capacity")


class ScaleError(RuntimeError):
    """The change cannot be made; the message says why."""


def deploy_body(status: dict[str, Any]) -> dict[str, Any]:
    """The PUT body that redeploys exactly what is running (GET's answer → ServeDeploySchema)."""
    apps = []
    for name, app in status.get("applications", {}).items():
        if not app.get("deployed_app_config"):
            raise ScaleError(f"application {name!r} was not deployed from a config; use `serve deploy` first")
        apps.append(app["deployed_app_config"])
    body = {k: status[k] for k in CONFIG_KEYS if status.get(k) is not None}
    body["applications"] = apps
    return body


def rescale(
    body: dict[str, Any],
    app: str,
    deployment: str,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    batch_size: int | None = None,
    batch_wait_s: float | None = None,
    sessions_per_replica: int | None = None,
) -> dict[str, Any]:
    """A copy of the deploy body with one deployment's scaling changed."""
    body = copy.deepcopy(body)
    apps = [a for a in body["applications"] if a["name"] == app]
    if not apps:
        raise ScaleError(f"no application {app!r}; running: {[a['name'] for a in body['applications']]}")
    deployments = apps[0].setdefault("deployments", [])
    entry = next((d for d in deployments if d["name"] == deployment), None)
    if entry is None:
        entry = {"name": deployment}
        deployments.append(entry)
    auto = entry.setdefault("autoscaling_config", {})
    if min_replicas is not None:
        auto["min_replicas"] = min_replicas
    if max_replicas is not None:
        auto["max_replicas"] = max_replicas
    if auto.get("min_replicas", 1) > auto.get("max_replicas", auto.get("min_replicas", 1)):
        raise ScaleError(f"min_replicas {auto['min_replicas']} > max_replicas {auto['max_replicas']}")
    if sessions_per_replica is not None:
        policy = auto.get("policy") or {}
        if not str(policy.get("policy_function", "")).endswith("SessionsPolicy"):
            raise ScaleError(f"{deployment} does not scale on sessions (no SessionsPolicy in its autoscaling_config)")
        # One setting sizes both the Ingress's lanes and the policy's target (the replicas report it):
        # an args change, so Serve redeploys the application (sessions move with 1012, as on any redeploy).
        apps[0].setdefault("args", {}).setdefault("vad", {})["sessions_per_replica"] = sessions_per_replica
    if batch_size is not None or batch_wait_s is not None:
        user = entry.setdefault("user_config", {})
        if batch_size is not None:
            user["max_batch_size"] = batch_size
        if batch_wait_s is not None:
            user["batch_wait_timeout_s"] = batch_wait_s
    return body


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="speech-serve scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("deployment", nargs="?", help="Ingress, VADHost, SenseVoice or Speaker")
    p.add_argument("--app", default="speech")
    p.add_argument("--address", default=DEFAULT_ADDRESS, help="Ray dashboard")
    p.add_argument("--min", type=int, dest="min_replicas")
    p.add_argument("--max", type=int, dest="max_replicas")
    p.add_argument("--batch-size", type=int, help="user_config.max_batch_size (SenseVoice, Speaker)")
    p.add_argument("--batch-wait-s", type=float, help="user_config.batch_wait_timeout_s")
    p.add_argument("--sessions-per-replica", type=int, help="vad.sessions_per_replica (VADHost's target; redeploys)")
    p.add_argument("--show", action="store_true", help="print the deployed config and exit")
    a = p.parse_args(argv)
    url = a.address.rstrip("/") + APPLICATIONS
    with httpx.Client(headers=auth_headers(), timeout=30) as client:
        r = client.get(url)
        if r.status_code != 200:
            sys.exit(f"GET {url}: HTTP {r.status_code} {r.text[:200]}")
        try:
            body = deploy_body(r.json())
            if a.show or not a.deployment:
                print(json.dumps(body, indent=2))
                return
            changed = rescale(body, a.app, a.deployment, a.min_replicas, a.max_replicas, a.batch_size,
                              a.batch_wait_s, a.sessions_per_replica)  # fmt: skip
        except ScaleError as exc:
            sys.exit(str(exc))
        put = client.put(url, json=changed)
        if put.status_code != 200:
            sys.exit(f"PUT {url}: HTTP {put.status_code} {put.text[:500]}")
    entry = next(d for d in next(x for x in changed["applications"] if x["name"] == a.app)["deployments"]
                 if d["name"] == a.deployment)  # fmt: skip
    print(f"applied to {a.app}/{a.deployment}: autoscaling_config={entry.get('autoscaling_config')} "
          f"user_config={entry.get('user_config')}")  # fmt: skip


if __name__ == "__main__":
    main()

"""/healthz's view of the deployments, fetched off the Ingress event loop.

`serve.status()` is a synchronous call to the Serve controller: on the event loop, which every
session of the replica shares, each probe would stall them all while the controller answers (and
/healthz takes no credentials). So it runs in a worker thread, one call at a time: concurrent
probes share the call in flight, an answer younger than `cache_s` is reused, and a probe waits at
most `timeout_s` (a controller that does not answer is reported, not waited for).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

from ray import serve

States = dict[str, dict]  # deployment -> {"status": ..., "replicas": {state: count}}

# What a device's transcript needs: the readiness of this pod. A Speaker (or the session registry)
# without a running replica degrades the answers (speaker unknown; admission unchecked), and must
# not take every pod out of a Kubernetes Service.
REQUIRED = ("Ingress", "VADHost", "SenseVoice")


def readiness(deployments: States) -> tuple[str, list[str]]:
    """"ok", "degraded" (ready, but an optional deployment has no running replica) or "starting",
    and the deployments that have none."""
    down = sorted(name for name, d in deployments.items() if d["replicas"].get("RUNNING", 0) == 0)
    if any(name not in deployments or name in down for name in REQUIRED):
        return "starting", down
    return ("degraded" if down else "ok"), down


def serve_deployment_states() -> States:
    """This application's deployments as the Serve controller sees them (blocking)."""
    app_name = serve.get_replica_context().app_name
    status = serve.status().applications[app_name]
    return {
        name: {"status": str(d.status.value), "replicas": dict(d.replica_states)}
        for name, d in status.deployments.items()
    }


class DeploymentStates:
    def __init__(
        self, fetch: Callable[[], States], cache_s: float, timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ):  # fmt: skip
        self._fetch, self.cache_s, self.timeout_s, self._now = fetch, cache_s, timeout_s, clock
        self._value: States | None = None
        self._fetched_at = float("-inf")
        self._in_flight: asyncio.Future | None = None

    async def get(self) -> States:
        """The states, at most `cache_s` old. Raises what the fetch raised, or TimeoutError."""
        if self._value is not None and self._now() - self._fetched_at < self.cache_s:
            return self._value
        if self._in_flight is None:
            self._in_flight = asyncio.ensure_future(asyncio.to_thread(self._fetch))
            self._in_flight.add_done_callback(self._fetched)
        # shield: a probe that gives up must not cancel the call the others wait for
        return await asyncio.wait_for(asyncio.shield(self._in_flight), self.timeout_s)

    def _fetched(self, future: asyncio.Future) -> None:
        self._in_flight = None
        if future.cancelled():
            return
        if future.exception() is None:  # reading the exception also marks it seen when nobody waited
            self._value, self._fetched_at = future.result(), self._now()


def public_source(described: str) -> str:
    """A model source as /healthz tells anyone: a local directory by its name, not its path."""
    return re.sub(r"(?<![\w.])/[^\s\[\]]*/([^\s/\[\]]+)", r"\1", described)

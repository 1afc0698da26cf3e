"""Ingress draining: what a replica does once Serve has decided to stop it.

Serve picks which Ingress replica to stop (scale-down, redeploy) without looking at its WebSockets,
then waits up to `graceful_shutdown_timeout_s` for its requests (our live sessions) to end before
killing it. Serve has no drain hook for user code, so the replica polls the controller for its own
state. From STOPPING on it:
  * refuses new sessions at once (close 1012 "service restart": reconnect now), though Serve's
    router already stops sending it any;
  * lets live sessions go on untouched: most end by themselves within the grace period;
  * `drain.margin_s` before Serve's deadline, asks the rest to reconnect: each waits for a pause
    between utterances (up to `drain.idle_wait_s`), sends every result it owes, then closes 1012.
Nothing is lost: an utterance still open at the deadline is cut and transcribed first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from speech_serve.messages import Refusal
from speech_serve.wire.codes import CLOSE_SERVICE_RESTART

logger = logging.getLogger("ray.serve")
DRAINING = Refusal("reconnect", "this server is shutting down; reconnect now", CLOSE_SERVICE_RESTART)

STOPPING, RUNNING = "STOPPING", "RUNNING"
ASR_DEPLOYMENT = "SenseVoice"


def replica_is_stopping(states: dict[str, str], replica_id: str) -> bool:
    """`states`: replica id -> state, as the controller lists them. An unknown replica is not
    treated as stopping: sessions are never cut on uncertain information."""
    return states.get(replica_id) == STOPPING


@dataclass(frozen=True)
class DrainPlan:
    started: float  # time.monotonic() when the stop was seen
    grace_s: float  # Serve's graceful_shutdown_timeout_s for this deployment
    margin_s: float  # ask sessions to reconnect this long before Serve's deadline

    def reconnect_in(self, now: float) -> float:
        """Seconds until sessions are asked to reconnect (0: now)."""
        return max(0.0, self.started + self.grace_s - self.margin_s - now)


class DrainWatch:
    """Polls this replica's state; `wait()` returns the plan once Serve starts stopping it."""

    def __init__(
        self,
        fetch_states: Callable[[], Awaitable[dict[str, str]]],
        replica_id: str,
        poll_s: float,
        grace_s: float,
        margin_s: float,
        fetch_timeout_s: float = 5.0,
    ):
        self._fetch, self.replica_id, self.poll_s = fetch_states, replica_id, poll_s
        self.fetch_timeout_s = fetch_timeout_s  # a controller call that never answers must not end the watch
        self.grace_s, self.margin_s = grace_s, margin_s
        self.plan: DrainPlan | None = None

    @property
    def draining(self) -> bool:
        return self.plan is not None

    async def wait(self) -> DrainPlan:
        while True:
            try:
                states = await asyncio.wait_for(self._fetch(), self.fetch_timeout_s)
            except Exception as exc:  # the controller may be restarting or stuck: keep serving, ask again
                logger.info("drain watch: controller unavailable (%s)", type(exc).__name__)
                states = {}
            if replica_is_stopping(states, self.replica_id):
                self.plan = DrainPlan(time.monotonic(), self.grace_s, self.margin_s)
                wait_s = self.plan.reconnect_in(time.monotonic())
                logger.warning("ingress replica %s is stopping: refusing new sessions; live ones asked to "
                               "reconnect in %.0f s", self.replica_id, wait_s)  # fmt: skip
                return self.plan
            await asyncio.sleep(self.poll_s)


_controller = None  # the Serve controller's handle, looked up once per process


async def controller_states(app_name: str, deployment: str) -> dict[str, str]:
    """Replica id -> state for one deployment, from the Serve controller. The handle is looked up
    in a worker thread, once: `ray.get_actor` is a blocking GCS call, and this runs on the event
    loop every session of the replica shares (each drain poll, each sync, the first admission)."""
    global _controller
    if _controller is None:
        _controller = await asyncio.to_thread(_serve_controller)
    try:
        details = await _controller.get_deployment_details.remote(app_name, deployment)
    except Exception:
        _controller = None  # look it up again next time (the controller may have been replaced)
        raise
    return {r.replica_id: str(r.state.value) for r in details.replicas}


def _serve_controller():
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)

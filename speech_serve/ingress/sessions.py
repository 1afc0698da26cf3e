"""This Ingress replica's sessions, from admission to release: who may open one, the
application-wide registry, and the drain watch.

Admission: a session over a cap is refused at once with a reason and a close code; it never
waits in a proxy queue. Two layers:
  * each Ingress replica refuses beyond `max_sessions_per_replica` (kept below Serve's
    `max_ongoing_requests`, so the proxy never queues a WebSocket) and while it drains;
  * the one-replica `SessionRegistry` (speech_serve/replicas/registry.py) sees every session of the
    application: the overall cap and the per-device connection limit.
This replica re-syncs its live sessions with the registry periodically (dropping sessions whose
release was lost, and rebuilding a registry that restarted empty, e.g. with its node); admissions
are numbered so a sync never drops one admitted after its snapshot.
Every registry call is bounded by `registry_timeout_s`: a registry that is restarting may take a
call and not answer, and a new session must then be admitted unchecked, not wait for ever.

Draining (drain.py): a stopping replica refuses new sessions and, near its deadline, asks the
live ones to reconnect.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from ray import serve

from speech_serve.ingress.auth import DeviceAuth
from speech_serve.ingress.capacity import ComputeAdmission
from speech_serve.ingress.connection import Connection
from speech_serve.ingress.drain import ASR_DEPLOYMENT, DRAINING, RUNNING, DrainWatch, controller_states
from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.stream.calls import awaited, bounded, detached
from speech_serve.messages import Refusal
from speech_serve.settings import AppSettings
from speech_serve.wire.codes import CLOSE_TRY_AGAIN_LATER

logger = logging.getLogger("ray.serve")
PROTOCOLS = ("plain", "xiaozhi", "funasr", "realtime")


def replica_full(limit: int) -> Refusal:
    return Refusal("server_busy", f"this server holds its maximum of {limit} sessions; retry later",
                   CLOSE_TRY_AGAIN_LATER)  # fmt: skip


def replica_refusal(draining: bool, live_here: int, max_per_replica: int) -> Refusal | None:
    """One Ingress replica's own answer to a new session, before the application-wide caps."""
    if draining:
        return DRAINING
    return replica_full(max_per_replica) if live_here >= max_per_replica else None


class Sessions:
    """The live connections of this replica, from admission to release."""

    def __init__(self, registry, settings: AppSettings, device_auth: DeviceAuth, metrics: IngressMetrics,
                 compute: ComputeAdmission | None = None, asr=None):  # fmt: skip
        self.registry = registry
        self.asr = asr  # SenseVoice's handle: the replicas' warm-up timings (measured compute cap)
        self.compute = compute or ComputeAdmission(settings.admission, compute=settings.compute)
        self.admission, self.drain = settings.admission, settings.drain
        self.health_timeout_s = settings.health.timeout_s  # bounds each drain poll of the controller
        self.device_auth = device_auth
        self.metrics = metrics
        self.live: dict[str, Connection] = {}  # for enrol-from-session and draining
        self._drain: DrainWatch | None = None  # started with the first session (needs the event loop)
        self._admit_seq = 0  # numbers our admissions, so a registry sync cannot drop a newer one
        self._admitting: set[str] = set()  # sessions whose admission is on its way
        self._asr_counted: asyncio.Future | None = None  # the latest count of SenseVoice replicas
        self._counted_at = 0.0  # when it started (monotonic)
        self._app_name = ""  # set with the first session, from the replica context

    async def serve(self, conn: Connection) -> None:
        """Authenticate (credentials parsed once), admit under that identity, run the connection
        to its end, release the very id that was admitted."""
        if not await conn.authenticate(self.device_auth):
            return  # refused before any registry call, slot or metric of an admitted session
        session_id = conn.session_id
        self._start_background()
        counting = self.watch_compute()
        if not self.compute.known():  # the first admissions wait for the cap (each call is bounded)
            await asyncio.shield(counting)
        refusal = self._local_refusal() or await self._register(session_id, conn.identity.device_id)
        if refusal is not None:
            self.metrics.session_rejected(conn.protocol, refusal.code)
            logger.info("session %s (%s) refused: %s", session_id, conn.protocol, refusal.message)
            await conn.refuse(refusal)
            return
        self.live[session_id] = conn
        self.metrics.session_admitted(conn.protocol)
        self._count()
        try:
            await conn.run()
        finally:
            self.live.pop(session_id, None)
            self._count()
            # shielded: Serve may cancel this request when its client leaves (direct ingress does);
            # the slot must still be given back now, not at the next sync
            await asyncio.shield(self._release(session_id))

    def watch_compute(self) -> asyncio.Future:
        """The count of SenseVoice replicas and their warm-up timings: the compute cap needs it before
        the first admission, and /healthz starts it too, so the cap is known before devices come. While
        a running replica has not answered (still warming up), a later call counts again, at most every
        `admission.sync_s` (the registry sync counts too)."""
        done = self._asr_counted is not None and self._asr_counted.done()
        stale = done and not self.compute.complete() and time.monotonic() - self._counted_at >= self.admission.sync_s
        if self._asr_counted is None or stale:
            self._counted_at = time.monotonic()
            if not self._app_name:
                try:
                    self._app_name = serve.get_replica_context().app_name
                except Exception:  # outside a Serve replica (unit tests): nothing to count
                    pass
            self._asr_counted = detached(self._count_asr_replicas())  # not the first session's child
        return self._asr_counted

    def _local_refusal(self) -> Refusal | None:
        """Sessions still in admission count too: a burst all waiting on the registry would pass."""
        here = len(self.live) + len(self._admitting)
        return (replica_refusal(self._drain.draining, here, self.admission.max_sessions_per_replica)
                or self.compute.refusal())  # fmt: skip

    async def _register(self, session_id: str, device: str | None) -> Refusal | None:
        """The application-wide caps, for the authenticated device. If the registry cannot answer,
        admit: a cap is not worth refusing everyone over."""
        self._admit_seq += 1
        self._admitting.add(session_id)
        try:
            return await self._registry_call("admit", session_id, self._replica_id, device, self._admit_seq,
                                             self.compute.sessions_cap())  # fmt: skip
        except Exception:  # TimeoutError included
            cap = self.compute.sessions_cap()  # the application's: what this replica alone may not pass
            if cap is not None and len(self.live) + len(self._admitting) > cap:
                return Refusal("server_busy", f"the speech models serve {cap} sessions and the session registry "
                               "cannot say how many run elsewhere; retry in a few seconds", CLOSE_TRY_AGAIN_LATER)
            logger.warning("session %s: session registry unavailable; admitted unchecked", session_id,
                           exc_info=True)  # fmt: skip
            return None
        finally:  # from here to `self.live[...] = conn` nothing awaits: no sync sees a gap
            self._admitting.discard(session_id)

    async def _registry_call(self, method: str, *args):
        """One registry call, cancelled on the registry if it takes over `registry_timeout_s`."""
        response = getattr(self.registry, method).remote(*args)
        return await bounded(awaited(response), self.admission.registry_timeout_s)

    async def _release(self, session_id: str) -> None:
        try:
            await self._registry_call("release", session_id)
        except Exception:  # the periodic sync corrects the registry
            logger.info("session %s: registry release failed; the next sync corrects it", session_id)

    async def _count_asr_replicas(self) -> None:
        """The compute cap follows the running SenseVoice replicas and, when measured, their warm-up
        timings (each call bounded: the controller or a replica may be busy)."""
        if self.compute.off or (self.compute.measured and self.asr is None):
            return  # no cap, or nothing to measure it from
        timeout = self.admission.registry_timeout_s
        try:
            states = await asyncio.wait_for(controller_states(self._app_name, ASR_DEPLOYMENT), timeout)
            self.compute.replicas_running({rid for rid, state in states.items() if state == RUNNING})
        except Exception:
            logger.info("could not count SenseVoice replicas; keeping %d", self.compute.asr_replicas)
        if self.compute.measured:
            await self._ask_timings(timeout)
        self.metrics.compute_cap_now(self.compute.sessions_cap())

    async def _ask_timings(self, timeout: float) -> None:
        """One call per running replica not heard from yet (Serve's router spreads them; a replica
        missed now is asked at the next sync, and counts as a typical one meanwhile)."""
        running = self.compute.running or set()
        missing = max(len(running - set(self.compute.timings)), 0 if self.compute.timings else 1)
        calls = [bounded(awaited(self.asr.capacity.remote()), timeout) for _ in range(missing)]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.info("a SenseVoice replica's warm-up timing did not come: %s", type(result).__name__)
                continue
            if result.replica not in self.compute.timings:
                derived = self.compute.per_replica_for(result)
                logger.info("admission by compute: SenseVoice replica %s serves %d sessions in time (%s)",
                            result.replica, derived.sessions, derived.why)  # fmt: skip
            self.compute.replica_seen(result)

    async def _sync_registry(self) -> None:
        while True:
            await asyncio.sleep(self.admission.sync_s)
            await self._count_asr_replicas()
            try:
                await self.sync_once()
            except Exception:
                logger.info("session registry sync failed; retrying in %g s", self.admission.sync_s)

    async def sync_once(self) -> None:
        """Our admitted sessions with their devices (a restarted registry counts them again) and
        those being admitted, as of our admission number: one snapshot, taken without awaiting."""
        live = {sid: conn.identity.device_id for sid, conn in self.live.items()}
        await self._registry_call("sync", self._replica_id, live, self._admit_seq, sorted(self._admitting))

    def _count(self) -> None:
        live = Counter(c.protocol for c in self.live.values())
        self.metrics.sessions_now({p: live.get(p, 0) for p in PROTOCOLS})

    def _start_background(self) -> None:
        """Drain watch and registry sync: started with the first session (they need the loop)."""
        if self._drain is not None:
            return
        ctx = serve.get_replica_context()
        self._replica_id = ctx.replica_id.unique_id
        self._app_name = ctx.app_name
        grace_s = ctx._deployment_config.graceful_shutdown_timeout_s  # what Serve enforces for this replica
        cap = self.admission.max_sessions_per_replica
        if cap >= ctx._deployment_config.max_ongoing_requests:
            logger.warning("admission.max_sessions_per_replica (%d) >= Ingress max_ongoing_requests (%d): "
                           "excess sessions will queue in the proxy instead of being refused",
                           cap, ctx._deployment_config.max_ongoing_requests)  # fmt: skip
        d = self.drain
        self._drain = DrainWatch(lambda: controller_states(ctx.app_name, ctx.deployment), self._replica_id,
                                 d.poll_s, grace_s, d.margin_s, self.health_timeout_s)  # fmt: skip
        self._background = [  # the replica's, not the first session's: Serve cancels a request's calls with it
            detached(self._move_sessions_when_stopping()),
            detached(self._sync_registry()),
        ]

    async def _move_sessions_when_stopping(self) -> None:
        plan = await self._drain.wait()
        await asyncio.sleep(plan.reconnect_in(time.monotonic()))
        logger.warning("ingress stopping: asking %d live sessions to reconnect", len(self.live))
        for conn in list(self.live.values()):
            conn.ask_to_reconnect(self.drain.idle_wait_s)

"""Ingress: the FastAPI app under @serve.ingress. One `StreamRunner` per WebSocket.

Routes
  GET  /healthz                   models real or test, replicas per deployment
  WS   /v1/stream                 plain JSON protocol (serve_app/protocols/plain.py)
  WS   /xiaozhi/v1/               Xiaozhi devices: Opus, hello/listen/abort, stt (protocols/xiaozhi.py)
  WS   /  and  /funasr            FunASR runtime protocol, subprotocol "binary" (protocols/funasr.py)
  POST /v1/audio/transcriptions   whole files, shaped like OpenAI's endpoint
  /v1/speakers ...                voiceprint enrolment: create, list, get, rename, re-enrol, delete

Who may call what (serve_app/auth.py): every device path (the WebSockets and the file
endpoint) takes device tokens when device authentication is on; /v1/speakers* always takes
the admin bearer token; /healthz is open. Refusals come before any session, body or model work.
"""

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable

from fastapi import FastAPI, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from starlette.datastructures import FormData

from serve_app import redact
from serve_app.admission import Refusal, replica_refusal
from serve_app.audio import AudioFormatError, AudioTooLongError, decode_file, ms_to_samples
from serve_app.auth import MISSING, AdminAuth, DeviceAuth, device_credentials, serve_bind_host
from serve_app.draining import DrainWatch, controller_states
from serve_app.enrollment import (
    EnrollFromSession,
    EnrollmentError,
    RenameRequest,
    check_name,
    decode_uploads,
    voiceprint_json,
)
from serve_app.funasr_stream import FunasrStream
from serve_app.messages import Utterance
from serve_app.metrics import IngressMetrics
from serve_app.models import ResolvedModels
from serve_app.pipeline import Pipeline, RecognitionOptions, live_runner_tasks
from serve_app.plain_stream import PlainStream
from serve_app.protocols import funasr as funasr_protocol
from serve_app.protocols import openai_files, plain
from serve_app.settings import AppSettings
from serve_app.stream_handler import CLOSE_POLICY, StreamHandler
from serve_app.uploads import UploadError, file_fields, read_form, text_field
from serve_app.voiceprints import open_store
from serve_app.xiaozhi_stream import XiaozhiStream

logger = logging.getLogger("ray.serve")
app = FastAPI(title="speech-serve", description="Realtime speech front-end: transcripts and speakers.")


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


def _target(scope: dict) -> str:
    """Path and query of a request, for refusal logs (the redaction filter masks any token)."""
    query = scope.get("query_string", b"").decode("latin-1")
    return scope.get("path", "") + (f"?{query}" if query else "")


# Each live WebSocket holds one request: Serve's default cap of 5 would queue the 6th session
# (and /healthz) in the proxy. config/serve.yaml sets the same value; this is the default without it.
@serve.deployment(max_ongoing_requests=200, graceful_shutdown_timeout_s=600)
@serve.ingress(app)
class Ingress:
    def __init__(self, vad, asr, speaker, registry, settings: AppSettings, models: ResolvedModels):
        self.settings = settings
        self.registry = registry
        self.models = models
        self.metrics = IngressMetrics()
        self.pipeline = Pipeline(vad, asr, speaker, settings, models.label, self.metrics)
        security = settings.security
        self.device_auth = DeviceAuth.from_settings(security, serve_bind_host(security.bind_host_timeout_s))
        self.admin_auth = AdminAuth.from_settings(security)
        redact.install(secrets=(self.device_auth.secret, self.admin_auth.token))  # before anything is logged
        self._log_security()
        self.voiceprints = open_store(settings.voiceprints.store)
        self.handlers: dict[str, StreamHandler] = {}  # live sessions of this replica, for enrol-from-session
        self._drain: DrainWatch | None = None  # started with the first session (needs the event loop)
        self._admit_seq = 0  # numbers our admissions, so a registry sync cannot drop a newer one
        self._admitting: set[str] = set()  # sessions whose admission is on its way
        for source in (models.vad, models.asr, models.speaker):
            logger.info("model %s: %s", source.role, source.describe())
        if models.warning():
            logger.warning(models.warning())

    def _log_security(self) -> None:
        auth = self.device_auth
        logger.info("device authentication %s: %s", "ON" if auth.enabled else "off", auth.why)
        if auth.problem:  # start anyway (health checks, the admin API) but say it loudly
            banner = "!" * 100
            logger.warning("\n%s\n%s\n%s", banner, auth.problem, banner)
        if not self.admin_auth.token:
            logger.warning(
                "the admin API (/v1/speakers*) answers 503 until %s is set in the environment",
                self.admin_auth.env_name,
            )

    # ---- health -------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when every deployment has a running replica, 503 while any is starting."""
        ready = False
        body = {
            "status": "starting",
            "models": self.models.label,
            "model_sources": {s.role: s.describe() for s in (self.models.vad, self.models.asr, self.models.speaker)},
            "live_sessions_this_replica": len(self.handlers),
            "stream_tasks_this_replica": live_runner_tasks(),  # 0 when idle: a leak check for soak tests
        }
        if self.models.warning():
            body["warning"] = self.models.warning()
        body["device_auth"] = {"enabled": self.device_auth.enabled, "why": self.device_auth.why}
        if self.device_auth.problem:
            body["device_auth"]["problem"] = self.device_auth.problem
        body["admin_api"] = "enabled" if self.admin_auth.token else f"disabled: {self.admin_auth.env_name} is not set"
        try:
            app_name = serve.get_replica_context().app_name
            status = serve.status().applications[app_name]
            body["deployments"] = {
                name: {"status": str(d.status.value), "replicas": dict(d.replica_states)}
                for name, d in status.deployments.items()
            }
            ready = all(d["replicas"].get("RUNNING", 0) > 0 for d in body["deployments"].values())
        except Exception as exc:  # the controller may be busy: report it, do not fail the probe's caller
            body["deployments"] = f"unavailable: {type(exc).__name__}"
        body["status"] = "ok" if ready else "starting"
        return JSONResponse(body, status_code=200 if ready else 503)

    # ---- sessions -----------------------------------------------------------------------
    async def _serve(self, handler: StreamHandler) -> None:
        self._start_background()
        refusal = self._local_refusal() or await self._register(handler)
        if refusal is not None:
            self.metrics.session_rejected(handler.protocol, refusal.code)
            logger.info("session %s (%s) refused: %s", handler.session_id, handler.protocol, refusal.message)
            await handler.refuse(refusal)
            return
        self.handlers[handler.session_id] = handler
        self.metrics.session_admitted(handler.protocol)
        self._count_sessions()
        try:
            await handler.run()
        finally:
            self.handlers.pop(handler.session_id, None)
            self._count_sessions()
            await self._release(handler.session_id)

    def _local_refusal(self) -> Refusal | None:
        cap = self.settings.admission.max_sessions_per_replica
        return replica_refusal(self._drain.draining, len(self.handlers), cap)

    async def _register(self, handler: StreamHandler) -> Refusal | None:
        """The application-wide caps. If the registry cannot answer, admit: a cap is not
        worth refusing everyone over."""
        device = device_credentials(handler.ws.headers, handler.ws.query_params).device_id
        self._admit_seq += 1
        self._admitting.add(handler.session_id)
        try:
            return await self.registry.admit.remote(handler.session_id, self._replica_id, device, self._admit_seq)
        except Exception:
            logger.warning("session %s: session registry unavailable; admitted unchecked", handler.session_id,
                           exc_info=True)  # fmt: skip
            return None
        finally:  # from here to `self.handlers[...] = handler` nothing awaits: no sync sees a gap
            self._admitting.discard(handler.session_id)

    async def _release(self, session_id: str) -> None:
        try:
            await self.registry.release.remote(session_id)
        except Exception:  # the periodic sync corrects the registry
            logger.info("session %s: registry release failed; the next sync corrects it", session_id)

    async def _sync_registry(self) -> None:
        while True:
            await asyncio.sleep(self.settings.admission.sync_s)
            try:
                live = [*self.handlers, *self._admitting]  # taken together with the number below
                await self.registry.sync.remote(self._replica_id, live, self._admit_seq)
            except Exception:
                logger.info("session registry sync failed; retrying in %g s", self.settings.admission.sync_s)

    def _count_sessions(self) -> None:
        live = Counter(h.protocol for h in self.handlers.values())
        self.metrics.sessions_now({p: live.get(p, 0) for p in ("plain", "xiaozhi", "funasr")})

    def _start_background(self) -> None:
        """Drain watch and registry sync: started with the first session (they need the loop)."""
        if self._drain is not None:
            return
        ctx = serve.get_replica_context()
        self._replica_id = ctx.replica_id.unique_id
        grace_s = ctx._deployment_config.graceful_shutdown_timeout_s  # what Serve enforces for this replica
        if self.settings.admission.max_sessions_per_replica >= ctx._deployment_config.max_ongoing_requests:
            logger.warning("admission.max_sessions_per_replica (%d) >= Ingress max_ongoing_requests (%d): "
                           "excess sessions will queue in the proxy instead of being refused",
                           self.settings.admission.max_sessions_per_replica,
                           ctx._deployment_config.max_ongoing_requests)  # fmt: skip
        s = self.settings.ingress
        self._drain = DrainWatch(lambda: controller_states(ctx.app_name, ctx.deployment), self._replica_id,
                                 s.drain_poll_s, grace_s, s.drain_margin_s)  # fmt: skip
        self._background = [
            asyncio.create_task(self._move_sessions_when_stopping()),
            asyncio.create_task(self._sync_registry()),
        ]

    async def _move_sessions_when_stopping(self) -> None:
        plan = await self._drain.wait()
        await asyncio.sleep(plan.reconnect_in(time.monotonic()))
        logger.warning("ingress stopping: asking %d live sessions to reconnect", len(self.handlers))
        for handler in list(self.handlers.values()):
            handler.ask_to_reconnect(self.settings.ingress.drain_idle_wait_s)

    # ---- plain JSON protocol ------------------------------------------------------------

    async def _admitted(self, ws: WebSocket, protocol: str, render_error: Callable[[str, str], str]) -> bool:
        """Device authentication of a plain or FunASR connection, before any session exists:
        a refusal is one error frame and close 1008. (Xiaozhi does the same in XiaozhiStream,
        after its connection parameters.)"""
        decision = self.device_auth.check(device_credentials(ws.headers, ws.query_params))
        if decision.ok:
            return True
        logger.warning("refused %s: %s", _target(ws.scope), decision.reason)
        self.metrics.session_rejected(protocol, "unauthorized")
        try:
            await ws.send_text(render_error("unauthorized", decision.reason))
            await ws.close(CLOSE_POLICY, f"unauthorized: {decision.reason}"[:120])
        except Exception:  # the client may be gone already
            pass
        return False

    @app.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        await ws.accept()
        if await self._admitted(ws, "plain", plain.render_error):
            await self._serve(PlainStream(ws, self.pipeline, new_session_id()))

    @app.websocket("/xiaozhi/v1/")
    @app.websocket("/xiaozhi/v1")
    async def xiaozhi(self, ws: WebSocket) -> None:
        await ws.accept()
        await self._serve(XiaozhiStream(ws, self.pipeline, new_session_id(), self.device_auth))

    @app.websocket("/")
    @app.websocket("/funasr")
    async def funasr(self, ws: WebSocket) -> None:
        # FunASR's client asks for the subprotocol "binary" and drops a connection without it.
        await ws.accept(subprotocol="binary" if "binary" in ws.scope.get("subprotocols", ()) else None)
        if await self._admitted(ws, "funasr", funasr_protocol.render_error):
            await self._serve(FunasrStream(ws, self.pipeline, new_session_id()))

    # ---- whole files (a device path: device authentication) ------------------------------
    def _require_device(self, request: Request) -> None:
        decision = self.device_auth.check(device_credentials(request.headers, request.query_params))
        if not decision.ok:
            logger.warning("refused %s: %s", _target(request.scope), decision.reason)
            headers = {"WWW-Authenticate": "Bearer"} if decision.status == MISSING else None
            raise HTTPException(decision.status, decision.reason, headers=headers)

    async def _form(self, request: Request, max_files: int) -> FormData:
        try:
            return await read_form(request, self.settings.ingress.max_upload_bytes, max_files)
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(self, request: Request) -> Response:
        """Form fields as OpenAI's: `file` (required), `model`, `language`, `response_format`."""
        self._require_device(request)
        form = await self._form(request, max_files=1)
        try:
            (upload,) = file_fields(form, "file")
            fmt = openai_files.check_response_format(text_field(form, "response_format", "json"))
            language = text_field(form, "language")
            data = await upload.read()
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except openai_files.TranscriptionRequestError as exc:
            raise HTTPException(400, str(exc)) from None
        finally:
            await form.close()
        try:
            pcm, duration_s = decode_file(data, self.settings.ingress.max_upload_s)
        except AudioTooLongError as exc:
            raise HTTPException(413, str(exc)) from None
        except AudioFormatError as exc:
            raise HTTPException(400, str(exc)) from None
        request_id = "file-" + uuid.uuid4().hex[:12]
        segments = await self.pipeline.segment(pcm, request_id)
        options = RecognitionOptions(language=language or "auto")
        utterances = [
            Utterance(i, a, b, pcm[ms_to_samples(a) : ms_to_samples(b)]) for i, (a, b) in enumerate(segments) if b > a
        ]
        recognised = await asyncio.gather(*(self.pipeline.recognise(request_id, u, options) for u in utterances))
        body, media_type = openai_files.render(fmt, [r for r, _ in recognised], duration_s, self.models.label)
        return Response(content=body, media_type=media_type)

    # ---- voiceprint enrolment (admin API: bearer token) ------------------------------------
    def _require_admin(self, request: Request) -> None:
        """Before anything else the request carries is looked at (form, JSON body)."""
        decision = self.admin_auth.check(request.headers.get("authorization"))
        if not decision.ok:
            logger.warning("refused %s %s: %s", request.method, request.url.path, decision.reason)
            headers = {"WWW-Authenticate": "Bearer"} if decision.status == MISSING else None
            raise HTTPException(decision.status, decision.reason, headers=headers)

    async def _embed_clips(self, clips) -> tuple[str, list]:
        results = await asyncio.gather(*(self.pipeline.embed(c, None, "enrolment") for c in clips))
        embeddings = [e for e, _, _ in results]
        if any(e is None for e in embeddings):
            raise HTTPException(503, "the speaker model is disabled (ingress.speaker_enabled: false)")
        return embeddings[0].model, [e.vector for e in embeddings]

    async def _enrolment_form(self, request: Request) -> tuple[FormData, list[tuple[str, bytes]]]:
        """The form (text fields) and its `files` as (filename, bytes), read into memory."""
        form = await self._form(request, max_files=self.settings.voiceprints.max_enroll_files)
        try:
            return form, [(f.filename or "file", await f.read()) for f in file_fields(form, "files")]
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        finally:
            await form.close()

    def _decode(self, files: list[tuple[str, bytes]]) -> list:
        try:
            return decode_uploads(files, self.settings.voiceprints)
        except EnrollmentError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    @staticmethod
    async def _json_body(request: Request, model: type[BaseModel]):
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as exc:
            raise HTTPException(
                422, exc.errors(include_url=False, include_context=False, include_input=False)
            ) from None

    def _found(self, vp):
        if vp is None:
            raise HTTPException(404, "no such speaker")
        return voiceprint_json(vp)

    @app.post("/v1/speakers", status_code=201)
    async def enroll(self, request: Request) -> dict:
        """Enrol a speaker from recordings of their voice (WAV, FLAC, OGG, MP3): multipart
        form with `name`, one or more `files`, and optionally `group`."""
        self._require_admin(request)
        form, files = await self._enrolment_form(request)
        try:
            name = check_name(text_field(form, "name", required=True))
        except (UploadError, EnrollmentError) as exc:
            raise HTTPException(exc.status, str(exc)) from None
        model, vectors = await self._embed_clips(self._decode(files))
        group = text_field(form, "group") or self.settings.voiceprints.default_group
        return voiceprint_json(self.voiceprints.create(name, group, model, vectors))

    @app.post("/v1/speakers/from-session", status_code=201)
    async def enroll_from_session(self, request: Request) -> dict:
        """Enrol from the latest utterances of a live session on this ingress replica
        (JSON: name, session_id, last_n, group)."""
        self._require_admin(request)
        body = await self._json_body(request, EnrollFromSession)
        handler = self.handlers.get(body.session_id)
        if handler is None or handler.runner is None:
            raise HTTPException(404, f"no live session {body.session_id!r} on this ingress replica")
        recent = list(handler.runner.embeddings)[-body.last_n :]
        if not recent:
            raise HTTPException(409, "the session has no finished utterance yet")
        group = body.group or handler.runner.options.speaker_group or self.settings.voiceprints.default_group
        model = recent[0][1].model
        return voiceprint_json(self.voiceprints.create(body.name, group, model, [e.vector for _, e in recent]))

    @app.get("/v1/speakers")
    async def list_speakers(self, request: Request, group: str | None = None) -> dict:
        self._require_admin(request)
        return {"speakers": [voiceprint_json(v) for v in self.voiceprints.list(group)]}

    @app.get("/v1/speakers/{speaker_id}")
    async def get_speaker(self, request: Request, speaker_id: str) -> dict:
        self._require_admin(request)
        return self._found(self.voiceprints.get(speaker_id))

    @app.patch("/v1/speakers/{speaker_id}")
    async def rename_speaker(self, request: Request, speaker_id: str) -> dict:
        self._require_admin(request)
        body = await self._json_body(request, RenameRequest)
        return self._found(self.voiceprints.rename(speaker_id, body.name.strip()))

    @app.put("/v1/speakers/{speaker_id}/embeddings")
    async def reenroll(self, request: Request, speaker_id: str) -> dict:
        """Replace a speaker's voiceprint with new recordings (multipart `files`)."""
        self._require_admin(request)
        if self.voiceprints.get(speaker_id) is None:
            raise HTTPException(404, "no such speaker")
        _, files = await self._enrolment_form(request)
        model, vectors = await self._embed_clips(self._decode(files))
        return self._found(self.voiceprints.replace_embeddings(speaker_id, model, vectors))

    @app.delete("/v1/speakers/{speaker_id}", status_code=204)
    async def delete_speaker(self, request: Request, speaker_id: str) -> Response:
        self._require_admin(request)
        if not self.voiceprints.delete(speaker_id):
            raise HTTPException(404, "no such speaker")
        return Response(status_code=204)

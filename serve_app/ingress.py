"""Ingress: the FastAPI app under @serve.ingress. One `StreamRunner` per WebSocket.

Routes
  GET  /healthz                   models real or test, replicas per deployment
  WS   /v1/stream                 plain JSON protocol (serve_app/protocols/plain.py)
  WS   /xiaozhi/v1/               Xiaozhi devices: Opus, hello/listen/abort, stt (protocols/xiaozhi.py)
  WS   /  and  /funasr            FunASR runtime protocol, subprotocol "binary" (protocols/funasr.py)
  POST /v1/audio/transcriptions   whole files, shaped like OpenAI's endpoint
  /v1/speakers ...                voiceprint enrolment: create, list, get, rename, re-enrol, delete
"""

import asyncio
import logging
import uuid
from typing import Annotated

from fastapi import FastAPI, File, Form, HTTPException, UploadFile, WebSocket
from fastapi.responses import JSONResponse, Response
from ray import serve

from serve_app.audio import AudioFormatError, decode_file, ms_to_samples
from serve_app.auth import DeviceAuth
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
from serve_app.models import ResolvedModels
from serve_app.pipeline import Pipeline, RecognitionOptions, live_runner_tasks
from serve_app.plain_stream import PlainStream
from serve_app.protocols import openai_files
from serve_app.settings import AppSettings
from serve_app.stream_handler import StreamHandler
from serve_app.voiceprints import open_store
from serve_app.xiaozhi_stream import XiaozhiStream

logger = logging.getLogger("ray.serve")
app = FastAPI(title="speech-serve", description="Realtime speech front-end: transcripts and speakers.")


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


# Each live WebSocket holds one request: Serve's default cap of 5 would queue the 6th session
# (and /healthz) in the proxy. config/serve.yaml sets the same value; this is the default without it.
@serve.deployment(max_ongoing_requests=200, graceful_shutdown_timeout_s=600)
@serve.ingress(app)
class Ingress:
    def __init__(self, vad, asr, speaker, settings: AppSettings, models: ResolvedModels):
        self.settings = settings
        self.models = models
        self.pipeline = Pipeline(vad, asr, speaker, settings, models.label)
        self.device_auth = DeviceAuth.from_settings(settings.xiaozhi)  # fails the replica if misconfigured
        self.voiceprints = open_store(settings.voiceprints.store)
        self.handlers: dict[str, StreamHandler] = {}  # live sessions of this replica, for enrol-from-session
        for source in (models.vad, models.asr, models.speaker):
            logger.info("model %s: %s", source.role, source.describe())
        if models.warning():
            logger.warning(models.warning())

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

    # ---- plain JSON protocol ------------------------------------------------------------
    async def _serve(self, handler: StreamHandler) -> None:
        self.handlers[handler.session_id] = handler
        try:
            await handler.run()
        finally:
            self.handlers.pop(handler.session_id, None)

    @app.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        await ws.accept()
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
        await self._serve(FunasrStream(ws, self.pipeline, new_session_id()))

    # ---- whole files --------------------------------------------------------------------
    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        self,
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()] = "sensevoice",
        language: Annotated[str | None, Form()] = None,
        response_format: Annotated[str, Form()] = "json",
    ) -> Response:
        try:
            fmt = openai_files.check_response_format(response_format)
        except openai_files.TranscriptionRequestError as exc:
            raise HTTPException(400, str(exc)) from None
        data = await file.read(self.settings.ingress.max_upload_bytes + 1)
        if len(data) > self.settings.ingress.max_upload_bytes:
            raise HTTPException(413, f"file larger than {self.settings.ingress.max_upload_bytes} bytes")
        try:
            pcm, duration_s = decode_file(data)
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

    # ---- voiceprint enrolment ---------------------------------------------------------------
    async def _embed_clips(self, clips) -> tuple[str, list]:
        results = await asyncio.gather(*(self.pipeline.embed(c, None, "enrolment") for c in clips))
        embeddings = [e for e, _, _ in results]
        if any(e is None for e in embeddings):
            raise HTTPException(503, "the speaker model is disabled (ingress.speaker_enabled: false)")
        return embeddings[0].model, [e.vector for e in embeddings]

    async def _uploads(self, files: list[UploadFile]) -> list:
        limit = self.settings.ingress.max_upload_bytes
        raw = [(f.filename or "file", await f.read(limit + 1)) for f in files]
        if any(len(data) > limit for _, data in raw):
            raise HTTPException(413, f"each file must be under {limit} bytes")
        try:
            return decode_uploads(raw, self.settings.voiceprints)
        except EnrollmentError as exc:
            raise HTTPException(exc.status, str(exc)) from None

    def _found(self, vp):
        if vp is None:
            raise HTTPException(404, "no such speaker")
        return voiceprint_json(vp)

    @app.post("/v1/speakers", status_code=201)
    async def enroll(
        self,
        name: Annotated[str, Form()],
        files: Annotated[list[UploadFile], File()],
        group: Annotated[str | None, Form()] = None,
    ) -> dict:
        """Enrol a speaker from one or more recordings of their voice (WAV, FLAC, OGG, MP3)."""
        try:
            name = check_name(name)
        except EnrollmentError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        model, vectors = await self._embed_clips(await self._uploads(files))
        group = group or self.settings.voiceprints.default_group
        return voiceprint_json(self.voiceprints.create(name, group, model, vectors))

    @app.post("/v1/speakers/from-session", status_code=201)
    async def enroll_from_session(self, body: EnrollFromSession) -> dict:
        """Enrol from the latest utterances of a live session on this ingress replica."""
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
    async def list_speakers(self, group: str | None = None) -> dict:
        return {"speakers": [voiceprint_json(v) for v in self.voiceprints.list(group)]}

    @app.get("/v1/speakers/{speaker_id}")
    async def get_speaker(self, speaker_id: str) -> dict:
        return self._found(self.voiceprints.get(speaker_id))

    @app.patch("/v1/speakers/{speaker_id}")
    async def rename_speaker(self, speaker_id: str, body: RenameRequest) -> dict:
        return self._found(self.voiceprints.rename(speaker_id, body.name.strip()))

    @app.put("/v1/speakers/{speaker_id}/embeddings")
    async def reenroll(self, speaker_id: str, files: Annotated[list[UploadFile], File()]) -> dict:
        """Replace a speaker's voiceprint with new recordings."""
        if self.voiceprints.get(speaker_id) is None:
            raise HTTPException(404, "no such speaker")
        model, vectors = await self._embed_clips(await self._uploads(files))
        return self._found(self.voiceprints.replace_embeddings(speaker_id, model, vectors))

    @app.delete("/v1/speakers/{speaker_id}", status_code=204)
    async def delete_speaker(self, speaker_id: str) -> Response:
        if not self.voiceprints.delete(speaker_id):
            raise HTTPException(404, "no such speaker")
        return Response(status_code=204)

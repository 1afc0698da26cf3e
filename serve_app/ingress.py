"""Ingress: the FastAPI app under @serve.ingress. One `StreamRunner` per WebSocket.

Routes
  GET  /healthz                   models real or test, replicas per deployment
  WS   /v1/stream                 plain JSON protocol (serve_app/protocols/plain.py)
  WS   /xiaozhi/v1/               Xiaozhi devices: Opus, hello/listen/abort, stt (protocols/xiaozhi.py)
  WS   /  and  /funasr            FunASR runtime protocol, subprotocol "binary" (protocols/funasr.py)
  POST /v1/audio/transcriptions   whole files, shaped like OpenAI's endpoint
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
from serve_app.funasr_stream import FunasrStream
from serve_app.messages import Utterance
from serve_app.models import ResolvedModels
from serve_app.pipeline import Pipeline, RecognitionOptions
from serve_app.plain_stream import PlainStream
from serve_app.protocols import openai_files
from serve_app.settings import AppSettings
from serve_app.stream_handler import StreamHandler
from serve_app.xiaozhi_stream import XiaozhiStream

logger = logging.getLogger("ray.serve")
app = FastAPI(title="speech-serve", description="Realtime speech front-end: transcripts and speakers.")

TEST_MODEL_WARNING = (
    "RANDOM-WEIGHT TEST MODELS IN USE: transcripts and speaker embeddings are meaningless. "
    "Point models.asr.path / models.speaker.path at real model directories, or run where the hub is reachable."
)


def new_session_id() -> str:
    return uuid.uuid4().hex[:16]


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, vad, asr, speaker, settings: AppSettings, models: ResolvedModels):
        self.settings = settings
        self.models = models
        self.pipeline = Pipeline(vad, asr, speaker, settings, models.label)
        self.live_sessions = 0
        self.device_auth = DeviceAuth.from_settings(settings.xiaozhi)  # fails the replica if misconfigured
        for source in (models.vad, models.asr, models.speaker):
            logger.info("model %s: %s", source.role, source.describe())
        if models.label == "test":
            logger.warning(TEST_MODEL_WARNING)

    # ---- health -------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """200 when every deployment has a running replica, 503 while any is starting."""
        ready = False
        body = {
            "status": "starting",
            "models": self.models.label,
            "model_sources": {s.role: s.describe() for s in (self.models.vad, self.models.asr, self.models.speaker)},
            "live_sessions_this_replica": self.live_sessions,
        }
        if self.models.label == "test":
            body["warning"] = TEST_MODEL_WARNING
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
        self.live_sessions += 1
        try:
            await handler.run()
        finally:
            self.live_sessions -= 1

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
        segments = await self.pipeline.vad.segment.remote(pcm)
        options = RecognitionOptions(language=language or "auto")
        utterances = [
            Utterance(i, a, b, pcm[ms_to_samples(a) : ms_to_samples(b)]) for i, (a, b) in enumerate(segments) if b > a
        ]
        recognised = await asyncio.gather(*(self.pipeline.recognise(request_id, u, options) for u in utterances))
        body, media_type = openai_files.render(fmt, [r for r, _ in recognised], duration_s, self.models.label)
        return Response(content=body, media_type=media_type)

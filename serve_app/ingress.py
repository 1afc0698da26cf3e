"""Ingress: the FastAPI app under @serve.ingress. One `StreamRunner` per WebSocket.

Routes
  GET  /healthz                   models real or test, replicas per deployment
  WS   /v1/stream                 plain JSON protocol (serve_app/protocols/plain.py)
  POST /v1/audio/transcriptions   whole files, shaped like OpenAI's endpoint
"""

import asyncio
import logging
import uuid
from typing import Annotated

import numpy as np
import soxr
from fastapi import FastAPI, File, Form, HTTPException, UploadFile, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from ray import serve

from serve_app.audio import AudioFormatError, decode_file, ms_to_samples
from serve_app.messages import Utterance, UtteranceResult
from serve_app.models import ResolvedModels
from serve_app.pipeline import Pipeline, RecognitionOptions, StreamRunner
from serve_app.protocols import openai_files, plain
from serve_app.settings import SAMPLE_RATE, AppSettings

logger = logging.getLogger("ray.serve")
app = FastAPI(title="speech-serve", description="Realtime speech front-end: transcripts and speakers.")

TEST_MODEL_WARNING = (
    "RANDOM-WEIGHT TEST MODELS IN USE: transcripts and speaker embeddings are meaningless. "
    "Point models.asr.path / models.speaker.path at real model directories, or run where the hub is reachable."
)
# WebSocket close codes (RFC 6455)
CLOSE_NORMAL, CLOSE_UNSUPPORTED_DATA, CLOSE_TOO_BIG, CLOSE_INTERNAL = 1000, 1003, 1009, 1011
FATAL_PROTOCOL_ERRORS = {"frame_too_large": CLOSE_TOO_BIG, "bad_audio": CLOSE_UNSUPPORTED_DATA}


class _Resampler:
    """Streaming resampler for one session: frame boundaries leave no clicks."""

    def __init__(self, rate: int):
        self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16") if rate != SAMPLE_RATE else None

    def __call__(self, pcm, last: bool = False):
        return pcm if self._stream is None else self._stream.resample_chunk(pcm, last=last)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, vad, asr, speaker, settings: AppSettings, models: ResolvedModels):
        self.settings = settings
        self.models = models
        self.pipeline = Pipeline(vad, asr, speaker, settings, models.label)
        self.live_sessions = 0
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
    @app.websocket("/v1/stream")
    async def stream(self, ws: WebSocket) -> None:
        await ws.accept()
        session_id = uuid.uuid4().hex[:16]
        limits = self.settings.ingress
        send_lock = asyncio.Lock()

        async def send(text: str) -> None:
            async with send_lock:
                await ws.send_text(text)

        async def on_result(result: UtteranceResult) -> None:
            await send(plain.render_result(result))

        async def on_failure(index: int, exc: Exception) -> None:
            await send(plain.render_error("recognition_failed", f"utterance {index} could not be recognised"))

        start = plain.StartMessage()
        await send(plain.render_ready(session_id, start, self.models.label, limits.vad_chunk_ms))
        session = self.pipeline.new_session(session_id)
        runner: StreamRunner | None = None  # created on the first audio, after an optional "start"
        resample = _Resampler(start.sample_rate)
        self.live_sessions += 1
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                try:
                    if message.get("bytes") is not None:
                        pcm = plain.parse_audio(message["bytes"], limits.max_frame_bytes)
                        if runner is None:
                            options = RecognitionOptions(start.language, start.itn, start.return_embedding)
                            runner = StreamRunner(self.pipeline, session, options, on_result, on_failure)
                        await runner.push(resample(pcm))
                        continue
                    parsed = plain.parse_text(message.get("text") or "")
                    if isinstance(parsed, plain.StartMessage):
                        if runner is not None:
                            raise plain.ProtocolError("bad_order", "'start' must come before any audio")
                        start, resample = parsed, _Resampler(parsed.sample_rate)
                        await send(plain.render_ready(session_id, start, self.models.label, limits.vad_chunk_ms))
                        continue
                    # end of stream
                    if runner is None:
                        runner = StreamRunner(self.pipeline, session, RecognitionOptions(), on_result, on_failure)
                    tail = resample(np.zeros(0, dtype=np.int16), last=True)
                    if len(tail):
                        await runner.push(tail)
                    count = await runner.finish()
                    replays, runner = runner.vad_replays, None
                    await send(plain.render_done(count, replays))
                    await ws.close(CLOSE_NORMAL)
                    return
                except plain.ProtocolError as exc:
                    await send(plain.render_error(exc.code, str(exc)))
                    if exc.code in FATAL_PROTOCOL_ERRORS:
                        await ws.close(FATAL_PROTOCOL_ERRORS[exc.code], exc.code)
                        return
        except WebSocketDisconnect:
            logger.info("session %s: client disconnected", session_id)
        except Exception:
            logger.exception("session %s: internal error", session_id)
            try:
                await send(plain.render_error("internal", "internal error; the session is closed"))
                await ws.close(CLOSE_INTERNAL)
            except Exception:
                pass
        finally:
            self.live_sessions -= 1
            if runner is not None:
                await runner.close()
            else:
                await self.pipeline.close_vad(session_id)

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

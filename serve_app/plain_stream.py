"""One WebSocket of the plain JSON protocol: frames in, results out.

The protocol itself (parsing, rendering) is pure, in `protocols/plain.py`; the audio work is
the `StreamRunner`'s. This class is the glue for one connection: frame order, error frames,
close codes, and cleanup however the connection ends.
"""

import asyncio
import logging

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from serve_app.audio import StreamResampler
from serve_app.messages import UtteranceResult
from serve_app.pipeline import Pipeline, RecognitionOptions, StreamRunner
from serve_app.protocols import plain

logger = logging.getLogger("ray.serve")

# WebSocket close codes (RFC 6455)
CLOSE_NORMAL, CLOSE_UNSUPPORTED_DATA, CLOSE_TOO_BIG, CLOSE_INTERNAL = 1000, 1003, 1009, 1011
FATAL_PROTOCOL_ERRORS = {"frame_too_large": CLOSE_TOO_BIG, "bad_audio": CLOSE_UNSUPPORTED_DATA}


class PlainStream:
    def __init__(self, ws: WebSocket, pipeline: Pipeline, session_id: str):
        self.ws = ws
        self.pipeline = pipeline
        self.session_id = session_id
        self.start = plain.StartMessage()
        self.resample = StreamResampler(self.start.sample_rate)
        self.runner: StreamRunner | None = None  # created on the first audio, after an optional "start"
        self._send_lock = asyncio.Lock()  # results and error frames come from different tasks

    async def run(self) -> None:
        """Serve the connection until the client ends it, leaves, or breaks the protocol."""
        try:
            await self._send_ready()
            while await self._handle(await self.ws.receive()):
                pass
        except WebSocketDisconnect:
            logger.info("session %s: client disconnected", self.session_id)
        except Exception:
            logger.exception("session %s: internal error", self.session_id)
            await self._close_with_error("internal", "internal error; the session is closed", CLOSE_INTERNAL)
        finally:
            if self.runner is not None:
                await self.runner.close()
            else:
                await self.pipeline.close_vad(self.session_id)

    async def _handle(self, message: dict) -> bool:
        """Handle one ASGI message; False when the connection is over."""
        if message["type"] == "websocket.disconnect":
            return False
        try:
            if message.get("bytes") is not None:
                pcm = plain.parse_audio(message["bytes"], self.pipeline.settings.ingress.max_frame_bytes)
                await self._runner().push(self.resample(pcm))
                return True
            parsed = plain.parse_text(message.get("text") or "")
            if isinstance(parsed, plain.StartMessage):
                if self.runner is not None:
                    raise plain.ProtocolError("bad_order", "'start' must come before any audio")
                self.start, self.resample = parsed, StreamResampler(parsed.sample_rate)
                await self._send_ready()
                return True
            await self._finish()
            return False
        except plain.ProtocolError as exc:
            if exc.code in FATAL_PROTOCOL_ERRORS:
                await self._close_with_error(exc.code, str(exc), FATAL_PROTOCOL_ERRORS[exc.code])
                return False
            await self._send(plain.render_error(exc.code, str(exc)))
            return True

    def _runner(self) -> StreamRunner:
        if self.runner is None:
            options = RecognitionOptions(self.start.language, self.start.itn, self.start.return_embedding)
            session = self.pipeline.new_session(self.session_id)
            self.runner = StreamRunner(self.pipeline, session, options, self._on_result, self._on_failure)
        return self.runner

    async def _finish(self) -> None:
        runner = self._runner()
        tail = self.resample(np.zeros(0, dtype=np.int16), last=True)
        if len(tail):
            await runner.push(tail)
        count = await runner.finish()
        self.runner = None  # finished: nothing left to cancel; run() frees the VAD state
        await self._send(plain.render_done(count, runner.vad_replays))
        await self.ws.close(CLOSE_NORMAL)

    async def _send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)

    async def _send_ready(self) -> None:
        label, chunk_ms = self.pipeline.models_label, self.pipeline.settings.ingress.vad_chunk_ms
        await self._send(plain.render_ready(self.session_id, self.start, label, chunk_ms))

    async def _on_result(self, result: UtteranceResult) -> None:
        await self._send(plain.render_result(result))

    async def _on_failure(self, index: int, exc: Exception) -> None:
        await self._send(plain.render_error("recognition_failed", f"utterance {index} could not be recognised"))

    async def _close_with_error(self, code: str, message: str, close_code: int) -> None:
        try:
            await self._send(plain.render_error(code, message))
            await self.ws.close(close_code, code)
        except Exception:  # the client may be gone already
            pass

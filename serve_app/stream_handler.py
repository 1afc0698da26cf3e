"""What every WebSocket protocol handler shares: a send lock, the runner's lifetime, and
cleanup however the connection ends. Subclasses implement `serve()` (the frame loop) and
`render_error()` (their protocol's error frame)."""

import asyncio
import logging

from fastapi import WebSocket, WebSocketDisconnect

from serve_app.limits import SessionLimitExceeded, TokenBucket
from serve_app.pipeline import Pipeline, RecognitionOptions, StreamRunner
from serve_app.protocols.errors import ProtocolError

logger = logging.getLogger("ray.serve")

# WebSocket close codes (RFC 6455)
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY = 1008  # policy violation: authentication refused, a per-session limit passed
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011


class StreamHandler:
    def __init__(self, ws: WebSocket, pipeline: Pipeline, session_id: str):
        self.ws = ws
        self.pipeline = pipeline
        self.session_id = session_id
        self.runner: StreamRunner | None = None
        self._send_lock = asyncio.Lock()  # results and error frames come from different tasks
        limits = pipeline.settings.ingress
        self._control_budget = TokenBucket(limits.control_per_s, limits.control_burst)
        self.protocol_errors = 0

    async def serve(self) -> None:
        raise NotImplementedError

    def render_error(self, code: str, message: str) -> str:
        raise NotImplementedError

    async def run(self) -> None:
        """Serve the connection until it ends, however it ends, and free what it held."""
        try:
            await self.serve()
        except WebSocketDisconnect:
            logger.info("session %s: client disconnected", self.session_id)
        except SessionLimitExceeded as exc:
            logger.warning("session %s: %s; closing", self.session_id, exc)
            await self.close_with_error(exc.code, str(exc), CLOSE_POLICY)
        except Exception:
            logger.exception("session %s: internal error", self.session_id)
            await self.close_with_error("internal", "internal error; the session is closed", CLOSE_INTERNAL)
        finally:
            await self.drop_runner()

    def start_runner(self, options: RecognitionOptions, **kwargs) -> StreamRunner:
        session = self.pipeline.new_session(self.session_id)
        self.runner = StreamRunner(self.pipeline, session, options, self.on_result, self.on_failure, **kwargs)
        return self.runner

    async def drop_runner(self) -> None:
        """Cancel what the runner still has in flight and free its VAD state."""
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.close()
        else:
            await self.pipeline.close_vad(self.session_id)

    async def finish_runner(self) -> tuple[int, int]:
        """End of stream: every result sent. Returns (utterances, VAD replays)."""
        runner = self.runner
        count = await runner.finish()
        await self.drop_runner()
        return count, runner.vad_replays

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)

    async def on_result(self, result) -> None:
        raise NotImplementedError

    async def on_failure(self, index: int, exc: Exception) -> None:
        await self.send(self.render_error("recognition_failed", f"utterance {index} could not be recognised"))

    async def close_with_error(self, code: str, message: str, close_code: int) -> None:
        try:
            await self.send(self.render_error(code, message))
            await self.ws.close(close_code, f"{code}: {message}"[:120])
        except Exception:  # the client may be gone already
            pass

    async def report(self, exc: ProtocolError) -> None:
        """Answer a client mistake the session survives, up to `max_protocol_errors` of them."""
        self.protocol_errors += 1
        limit = self.pipeline.settings.ingress.max_protocol_errors
        if self.protocol_errors > limit:
            raise SessionLimitExceeded("too_many_errors", f"more than {limit} protocol errors (last: {exc.code})")
        await self.send(self.render_error(exc.code, str(exc)))

    def count_control(self) -> None:
        """One control frame against the session's budget (`control_burst`, `control_per_s`)."""
        if not self._control_budget.take():
            bucket = self._control_budget
            raise SessionLimitExceeded(
                "too_many_messages",
                f"more than {bucket.burst} control frames at once or {bucket.rate_per_s:g} per second",
            )

    async def receive(self) -> dict:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", CLOSE_NORMAL))
        if message.get("text") is not None:
            self.count_control()
        return message

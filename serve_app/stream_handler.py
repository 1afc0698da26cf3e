"""What every WebSocket protocol handler shares: a send lock, the runner's lifetime, and
cleanup however the connection ends. Subclasses implement `serve()` (the frame loop) and
`render_error()` (their protocol's error frame).

Frames are read by their own task into an inbox, so a client that leaves is noticed at once,
even while the frame loop is behind (busy in a VAD call with frames waiting): its frame loop is
cancelled, its model work dropped, and its admission slot freed without working through the
backlog for nobody."""

import asyncio
import logging
import time

from fastapi import WebSocket, WebSocketDisconnect

from serve_app.admission import DRAINING, Refusal
from serve_app.limits import SessionLimitExceeded, TokenBucket
from serve_app.messages import UtteranceResult
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

RECONNECT_POLL_S = 0.1  # while asked to reconnect: how often to look for a pause between utterances


class ReconnectRequested(Exception):
    """Raised inside the frame loop once the session should move to another replica."""


class SessionIdle(Exception):
    """Raised inside the frame loop when the client has sent nothing for idle_timeout_s."""


class StreamHandler:
    protocol = "?"  # metrics tag: plain, xiaozhi, funasr

    def __init__(self, ws: WebSocket, pipeline: Pipeline, session_id: str):
        self.ws = ws
        self.pipeline = pipeline
        self.session_id = session_id
        self.runner: StreamRunner | None = None
        self._send_lock = asyncio.Lock()  # results and error frames come from different tasks
        self._inbox: asyncio.Queue[dict | BaseException] = asyncio.Queue()  # filled by _read_frames
        self._next_frame: asyncio.Future | None = None  # kept across receive() calls: never cancelled
        self._client_gone = asyncio.Event()  # the client's disconnect has been read
        self._reconnect = asyncio.Event()
        self._reconnect_asked: asyncio.Future | None = None
        self._reconnect_by: float | None = None  # monotonic deadline; before it, wait for a pause
        self._answered_since_asked = False
        limits = pipeline.settings.ingress
        self._control_budget = TokenBucket(limits.control_per_s, limits.control_burst)
        self.protocol_errors = 0

    async def serve(self) -> None:
        raise NotImplementedError

    def render_error(self, code: str, message: str) -> str:
        raise NotImplementedError

    async def run(self) -> None:
        """Serve the connection until it ends, however it ends, and free what it held."""
        reader = asyncio.create_task(self._read_frames())
        try:
            await self._serve_until_gone()
        except WebSocketDisconnect:
            logger.info("session %s: client disconnected", self.session_id)
        except ReconnectRequested:
            await self._move_client()
        except SessionIdle:
            await self._close_idle()
        except SessionLimitExceeded as exc:
            logger.warning("session %s: %s; closing", self.session_id, exc)
            await self.close_with_error(exc.code, str(exc), CLOSE_POLICY)
        except Exception:
            logger.exception("session %s: internal error", self.session_id)
            await self.close_with_error("internal", "internal error; the session is closed", CLOSE_INTERNAL)
        finally:
            for waiting in (self._next_frame, self._reconnect_asked, reader):
                if waiting is not None:
                    waiting.cancel()
            self.drop_runner()

    async def _serve_until_gone(self) -> None:
        """`serve()`, cut short when the client disconnects: frames still in the inbox and
        utterances still being recognised are for nobody now."""
        serving = asyncio.create_task(self.serve())
        gone = asyncio.create_task(self._client_gone.wait())
        try:
            await asyncio.wait({serving, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not serving.done():
            serving.cancel()
            await asyncio.wait({serving})
            logger.info("session %s: client disconnected; %d unread frame(s) dropped",
                        self.session_id, self._inbox.qsize())  # fmt: skip
            return
        serving.result()  # re-raises how the frame loop ended

    async def _read_frames(self) -> None:
        """Move every frame into the inbox as it arrives; stop after the disconnect."""
        while True:
            try:
                message = await self.ws.receive()
            except Exception as exc:  # handed to the frame loop, which decides what it means
                self._inbox.put_nowait(exc)
                self._client_gone.set()
                return
            self._inbox.put_nowait(message)
            if message["type"] == "websocket.disconnect":
                self._client_gone.set()
                return

    def start_runner(self, options: RecognitionOptions, **kwargs) -> StreamRunner:
        session = self.pipeline.new_session(self.session_id)
        self.runner = StreamRunner(self.pipeline, session, options, self._deliver, self._failed, **kwargs)
        return self.runner

    async def _deliver(self, result: UtteranceResult) -> None:
        self.pipeline.metrics.utterance_answered(self.protocol, result)
        await self.on_result(result)
        self._answered_since_asked = self._reconnect.is_set()

    async def _failed(self, index: int, exc: Exception) -> None:
        self.pipeline.metrics.utterance_failed(self.protocol)
        await self.on_failure(index, exc)

    # ---- draining: move the client to another replica -------------------------------------
    def ask_to_reconnect(self, within_s: float) -> None:
        """Close with 1012 in the pause after the next result, or after `within_s` at the latest."""
        self._reconnect_by = time.monotonic() + within_s
        self._reconnect.set()

    def _may_move_now(self) -> bool:
        # Right after a result the speaker has just paused (the VAD saw max_end_silence_ms of
        # silence). Any other "idle" moment may be the start of speech the VAD has not reported
        # yet, and closing then would cut that utterance in two.
        if self.runner is None:
            return True
        if self.runner.idle and self._answered_since_asked:
            return True
        return time.monotonic() >= self._reconnect_by

    async def _move_client(self) -> None:
        """Send every result owed (an open utterance is cut and transcribed), then 1012 with
        how much audio was taken: frames the client sent after that were never read."""
        received_ms = 0
        if self.runner is not None:
            received_ms = self.runner.session.received_ms
            await self.finish_runner()
        self.pipeline.metrics.session_reconnect(self.protocol)
        logger.info("session %s: asked to reconnect (ingress replica stopping) after %d ms of audio",
                    self.session_id, received_ms)  # fmt: skip
        frame = self.render_reconnect(DRAINING.message, received_ms)
        await self.close_with_error(DRAINING.code, DRAINING.message, DRAINING.close_code, frame)

    def render_reconnect(self, message: str, received_ms: int) -> str:
        """The `reconnect` error frame; protocols that can carry it add `received_ms`."""
        return self.render_error(DRAINING.code, message)

    async def refuse(self, refusal: Refusal) -> None:
        await self.close_with_error(refusal.code, refusal.message, refusal.close_code)

    def drop_runner(self) -> None:
        """Cancel what the runner still has in flight; its VAD state is freed in the background
        (the VADHost may be busy, and nobody should wait for that)."""
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.close()
        else:
            self.pipeline.close_vad_later(self.session_id)

    async def finish_runner(self) -> tuple[int, int]:
        """End of stream: every result sent. Returns (utterances, VAD replays)."""
        runner = self.runner
        count = await runner.finish()
        self.drop_runner()
        return count, runner.vad_replays

    async def _close_idle(self) -> None:
        if self.runner is not None:
            await self.finish_runner()
        timeout = self.pipeline.settings.ingress.idle_timeout_s
        logger.info("session %s: idle for %g s; closing", self.session_id, timeout)
        await self.close_with_error("idle_timeout", f"nothing received for {timeout:g} s", CLOSE_NORMAL)

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)

    async def on_result(self, result) -> None:
        raise NotImplementedError

    async def on_failure(self, index: int, exc: Exception) -> None:
        await self.send(self.render_error("recognition_failed", f"utterance {index} could not be recognised"))

    async def close_with_error(self, code: str, message: str, close_code: int, frame: str | None = None) -> None:
        """The error frame (the protocol's rendering of code and message, unless `frame` is
        given), then the close."""
        try:
            await self.send(frame if frame is not None else self.render_error(code, message))
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
        """The next frame. Raises WebSocketDisconnect when the client has gone,
        ReconnectRequested once the session should move (between utterances), and SessionIdle
        after idle_timeout_s without a frame."""
        if self._next_frame is None:
            self._next_frame = asyncio.ensure_future(self._inbox.get())
        while True:
            if self._reconnect.is_set():
                if self._may_move_now():
                    raise ReconnectRequested
                await asyncio.wait({self._next_frame}, timeout=RECONNECT_POLL_S)
            else:
                if self._reconnect_asked is None:
                    self._reconnect_asked = asyncio.ensure_future(self._reconnect.wait())
                done, _ = await asyncio.wait(
                    {self._next_frame, self._reconnect_asked},
                    timeout=self.pipeline.settings.ingress.idle_timeout_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    raise SessionIdle
            if self._next_frame.done():
                break
        message, self._next_frame = self._next_frame.result(), None
        if isinstance(message, BaseException):
            raise message
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", CLOSE_NORMAL))
        if message.get("text") is not None:
            self.count_control()
        return message

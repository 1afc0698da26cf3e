"""One WebSocket from its first frame to its close, for every protocol: a reader task moves frames into
an inbox within the client's bounds, the frame loop dispatches them to the protocol; sending, errors
and close codes, idling, and moving to another replica when this one stops. A protocol (protocols/)
fills in the hooks: `render_error()`, `open()` (optional), `on_frame()`, `render_result()`.

The reader runs apart from the frame loop, so a client that leaves is noticed at once, even while the
frame loop is behind (busy in a VAD call with frames waiting): its frame loop is cancelled, its model
work dropped, and its admission slot freed without working through the backlog for nobody."""

from __future__ import annotations

import asyncio
import logging
import operator
import time
from collections.abc import Mapping

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect

from speech_serve.ingress.auth import (
    AuthDecision,
    CredentialError,
    Credentials,
    DeviceAuth,
    GroupNotAllowed,
    Identity,
    device_credentials,
    request_target,
)
from speech_serve.ingress.drain import DRAINING
from speech_serve.ingress.limits import SessionIntake, SessionLimitExceeded, TokenBucket
from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.protocols.parsing import ProtocolError
from speech_serve.ingress.stream import RecognitionOptions, UtteranceStream, UtteranceStreams
from speech_serve.messages import Refusal, UtteranceResult
from speech_serve.settings import LimitSettings
from speech_serve.wire import codes

logger = logging.getLogger("ray.serve")

# A protocol error with one of these codes ends the connection with this close code; any other
# is answered with an error frame and the session goes on (up to `max_protocol_errors`).
FATAL_ERRORS = {
    "frame_too_large": codes.CLOSE_TOO_BIG,
    "bad_audio": codes.CLOSE_UNSUPPORTED_DATA,  # plain, FunASR: odd-length PCM (a bad Opus packet is only dropped)
    "unsupported_audio": codes.CLOSE_UNSUPPORTED_DATA,
    "bad_protocol_version": codes.CLOSE_PROTOCOL_ERROR,
    "hello_timeout": codes.CLOSE_PROTOCOL_ERROR,
}
RECONNECT_POLL_S = 0.1  # while asked to reconnect: how often to look for a pause between utterances


def frame_size(message: Mapping) -> int:
    """Bytes of a received WebSocket frame (characters for text: a cheap lower bound)."""
    data = message.get("bytes")
    return len(data) if data is not None else len(message.get("text") or "")


class QueuedBytes:
    """Bytes read from the socket but not handled yet (pure): past `limits.max_queued_bytes` the session
    is closed. Not reading would not slow the client: Ray Serve reads every WebSocket message off the
    socket as it comes (its receive proxy, direct ingress or not) into a queue of its own, so frames
    left unread pile up in the Ingress's memory (2 GB in 20 s, measured, from one client)."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def add(self, message: Mapping) -> None:
        self.count += frame_size(message)
        if self.behind:
            raise SessionLimitExceeded("too_far_ahead", f"more than {self.limit} bytes sent ahead of what the "
                                       "session has taken: send audio at most a little faster than real time")

    def take(self, message: Mapping) -> None:
        self.count -= frame_size(message)

    @property
    def behind(self) -> bool:
        return self.count > self.limit


class ReconnectRequested(Exception):
    """Raised inside the frame loop once the session should move to another replica."""


class SessionIdle(Exception):
    """Raised inside the frame loop when the client has sent nothing for idle_timeout_s."""


class Connection:
    """Owns at most one `UtteranceStream` at a time. `session_id`: what the session is admitted, counted and
    released under, fixed (read-only); a stream may have an id of its own (FunASR's second file)."""

    protocol = "?"  # metrics tag: plain, xiaozhi, funasr, realtime
    # Every text frame counts against the control budget as it is taken from the inbox; a protocol whose
    # audio comes in text frames (Realtime's appends) sets False and counts its control events itself.
    text_is_control = True
    session_id = property(operator.attrgetter("_session_id"))

    def __init__(self, ws: WebSocket, session_id: str, streams: UtteranceStreams, limits: LimitSettings,
                 metrics: IngressMetrics):  # fmt: skip
        self.ws, self._session_id, self.streams, self.limits, self.metrics = ws, session_id, streams, limits, metrics
        self.identity = Identity()  # who the session is admitted as: set by authenticate()
        self.stream: UtteranceStream | None = None
        self.intake = SessionIntake(limits)  # checked by the reader and push_audio
        self.queued = QueuedBytes(limits.max_queued_bytes)
        self.protocol_errors = 0
        self._send_lock = asyncio.Lock()  # results and error frames come from different tasks
        self._inbox: asyncio.Queue[dict | BaseException] = asyncio.Queue()  # filled by _read_frames
        self._next_frame: asyncio.Future | None = None  # kept across receive() calls: never cancelled
        self._client_gone = asyncio.Event()  # the client's disconnect has been read
        self._over_limit: SessionLimitExceeded | None = None  # why the reader stopped reading
        self._reader_refused = asyncio.Event()
        self._control_budget = TokenBucket(limits.control_per_s, limits.control_burst)
        self._reconnect = asyncio.Event()
        self._reconnect_asked: asyncio.Future | None = None
        self._reconnect_by: float | None = None  # monotonic deadline; before it, wait for a pause
        self._answered_since_asked = False

    # ---- the hooks a protocol fills in ----------------------------------------------------------
    def render_error(self, code: str, message: str) -> str:
        raise NotImplementedError

    def render_protocol_error(self, exc: ProtocolError) -> str:
        """The error frame for a client mistake; protocols that name the field at fault override it."""
        return self.render_error(exc.code, str(exc))

    async def open(self) -> bool:
        """Before the first frame (after admission). False if the connection is already closed."""
        return True

    async def on_frame(self, message: dict) -> bool:
        """One frame; False when the connection is over. A ProtocolError is answered by the loop."""
        raise NotImplementedError

    def render_result(self, result: UtteranceResult) -> str:
        """The frame that answers one utterance."""
        raise NotImplementedError

    def render_failure(self, index: int) -> str:
        return self.render_error("recognition_failed", f"utterance {index} could not be recognised")

    def render_reconnect(self, message: str, received_ms: int) -> str:
        """The `reconnect` error frame; protocols that can carry it add `received_ms`."""
        return self.render_error(DRAINING.code, message)

    def credentials(self) -> Credentials:
        """What the connection says about itself, read once by the shared parser (CredentialError)."""
        return device_credentials(self.ws.headers, self.ws.query_params)

    def speaker_group(self, requested: str | None, fallback: str | None = None) -> str | None:
        """The stream's speaker group: the authenticated device's when device auth is on (a client
        naming another gets a protocol error), else `requested`, else `fallback`."""
        try:
            return self.identity.speaker_group(requested) or fallback
        except GroupNotAllowed as exc:
            raise ProtocolError("speaker_group_not_allowed", str(exc)) from None

    # ---- the loop -------------------------------------------------------------------------------
    async def authenticate(self, auth: DeviceAuth) -> bool:
        """Before any session exists; on success `identity` is who the session is admitted as. A
        refusal is one error frame and close 1008."""
        try:
            decision: AuthDecision = auth.check(self.credentials())
        except CredentialError as exc:
            decision = AuthDecision(False, str(exc), exc.status)
        if decision.ok:
            self.identity = decision.identity
            return True
        logger.warning("refused %s: %s", request_target(self.ws.scope), decision.reason)
        self.metrics.session_rejected(self.protocol, "unauthorized")
        await self.close_with_error("unauthorized", decision.reason, codes.CLOSE_POLICY)
        return False

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
            await self.close_with_error(exc.code, str(exc), FATAL_ERRORS.get(exc.code, codes.CLOSE_POLICY))
        except Exception:
            logger.exception("session %s: internal error", self.session_id)
            await self.close_with_error("internal", "internal error; the session is closed", codes.CLOSE_INTERNAL)
        finally:
            for waiting in (self._next_frame, self._reconnect_asked, reader):
                if waiting is not None:
                    waiting.cancel()
            self.drop_stream()

    async def _serve(self) -> None:
        if await self.open():
            while await self._dispatch(await self.receive()):
                pass

    async def _serve_until_gone(self) -> None:
        """`_serve()`, cut short when the client disconnects (what is still queued is for nobody now) or
        when the reader refuses what the client sends (a flood stops as it arrives, not after its backlog)."""
        serving, gone = asyncio.create_task(self._serve()), asyncio.create_task(self._client_gone.wait())
        refused = asyncio.create_task(self._reader_refused.wait())
        try:
            await asyncio.wait({serving, gone, refused}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # Serve cancels the request when its client leaves (direct ingress)
            serving.cancel()  # else the frame loop reads the queued frames into a new stream for nobody
            await asyncio.wait({serving})
            raise
        finally:
            gone.cancel()
            refused.cancel()
        if not serving.done():
            serving.cancel()
            await asyncio.wait({serving})
            if self._over_limit is not None:
                raise self._over_limit
            logger.info("session %s: client disconnected; %d unread frame(s) dropped",
                        self.session_id, self._inbox.qsize())  # fmt: skip
            return
        serving.result()  # re-raises how the frame loop ended

    async def _read_frames(self) -> None:
        """Every frame into the inbox as it arrives, within the intake bounds (`max_queued_bytes` among them);
        stop after the disconnect or the first frame past a bound."""
        while True:
            try:
                message = await self.ws.receive()
            except Exception as exc:  # handed to the frame loop, which decides what it means
                self._inbox.put_nowait(exc)
                self._client_gone.set()
                return
            if message["type"] == "websocket.receive":
                try:
                    self.intake.arrived(message)
                    self.queued.add(message)
                except SessionLimitExceeded as exc:
                    self._over_limit = exc
                    self._reader_refused.set()
                    return
            self._inbox.put_nowait(message)
            if message["type"] == "websocket.disconnect":
                self._client_gone.set()
                return

    async def _dispatch(self, message: dict) -> bool:
        try:
            return await self.on_frame(message)
        except ProtocolError as exc:
            return await self.answer(exc)

    async def answer(self, exc: ProtocolError) -> bool:
        """A client mistake: a fatal one closes the connection (False); others are reported."""
        if exc.code in FATAL_ERRORS:
            await self.close_with_error(exc.code, str(exc), FATAL_ERRORS[exc.code], self.render_protocol_error(exc))
            return False
        await self.report(exc)
        return True

    async def report(self, exc: ProtocolError) -> None:
        """Answer a client mistake the session survives, up to `max_protocol_errors` of them."""
        self.protocol_errors += 1
        limit = self.limits.max_protocol_errors
        if self.protocol_errors > limit:
            raise SessionLimitExceeded("too_many_errors", f"more than {limit} protocol errors (last: {exc.code})")
        await self.send(self.render_protocol_error(exc))

    async def receive(self, timeout_s: float | None = None) -> dict:
        """The next frame. Raises WebSocketDisconnect when the client has gone, ReconnectRequested
        once the session should move (between utterances), SessionIdle after idle_timeout_s without
        a frame, and TimeoutError after `timeout_s`, if given."""
        if self._next_frame is None:
            self._next_frame = asyncio.ensure_future(self._inbox.get())
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._reconnect.is_set():
                if self._may_move_now():
                    raise ReconnectRequested
                await asyncio.wait({self._next_frame}, timeout=RECONNECT_POLL_S)
            else:
                if self._reconnect_asked is None:
                    self._reconnect_asked = asyncio.ensure_future(self._reconnect.wait())
                wait_s = self.limits.idle_timeout_s
                if deadline is not None and deadline - time.monotonic() < wait_s:
                    wait_s = max(deadline - time.monotonic(), 0.001)
                done, _ = await asyncio.wait({self._next_frame, self._reconnect_asked}, timeout=wait_s,
                                             return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                if not done:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError
                    raise SessionIdle
            if self._next_frame.done():
                break
        message, self._next_frame = self._next_frame.result(), None
        if isinstance(message, BaseException):
            raise message
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", codes.CLOSE_NORMAL))
        self.queued.take(message)
        if message.get("text") is not None and self.text_is_control:
            self.count_control()
        return message

    def count_control(self) -> None:
        """One control frame against the session's budget (`control_burst`, `control_per_s`)."""
        if not (bucket := self._control_budget).take():
            raise SessionLimitExceeded("too_many_messages", f"more than {bucket.burst} control frames at once or "
                                       f"{bucket.rate_per_s:g} per second")  # fmt: skip

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)

    async def close_with_error(self, code: str, message: str, close_code: int, frame: str | None = None) -> None:
        """The error frame (the protocol's rendering, unless `frame` is given), then the close."""
        try:
            await self.send(frame if frame is not None else self.render_error(code, message))
            await self.ws.close(close_code, codes.close_reason(f"{code}: {message}"))
        except Exception:  # the client may be gone already
            pass

    async def refuse(self, refusal: Refusal) -> None:
        await self.close_with_error(refusal.code, refusal.message, refusal.close_code)

    # ---- the utterance stream -------------------------------------------------------------------
    async def push_audio(self, pcm: np.ndarray, paced_as: int = 0) -> None:
        """Client audio (16 kHz) into the open stream, paced to at most `max_audio_rate` (as `paced_as`
        samples where the frame cost more than its audio)."""
        wait = self.intake.audio_wait(max(len(pcm), paced_as))
        if wait > 0:
            await asyncio.sleep(wait)
        await self.stream.push(pcm)

    def start_stream(self, options: RecognitionOptions, stream_id: str | None = None, **extra) -> UtteranceStream:
        """`stream_id`: the stream's own id (its VAD state's), when not the session's."""
        self.stream = self.streams.open(stream_id or self.session_id, options, self._deliver, self._failed, **extra)
        return self.stream

    async def _deliver(self, result: UtteranceResult) -> None:
        self.metrics.utterance_answered(self.protocol, result)
        await self.send(self.render_result(result))
        self._answered_since_asked = self._reconnect.is_set()

    async def _failed(self, index: int, exc: Exception) -> None:
        self.metrics.utterance_failed(self.protocol)
        await self.send(self.render_failure(index))

    def drop_stream(self) -> None:
        """Cancel what the stream still has in flight; its VAD state is freed in the background (the
        VADHost may be busy, and nobody should wait for that)."""
        stream, self.stream = self.stream, None
        if stream is not None:  # no stream, no VAD state: closing it twice would send two calls at once
            stream.close()

    async def finish_stream(self) -> tuple[int, int]:
        """End of stream: every result sent. Returns (utterances, VAD replays)."""
        stream = self.stream
        count = await stream.finish()
        self.drop_stream()
        return count, stream.vad_replays

    async def _close_idle(self) -> None:
        if self.stream is not None:
            await self.finish_stream()
        timeout = self.limits.idle_timeout_s
        logger.info("session %s: idle for %g s; closing", self.session_id, timeout)
        await self.close_with_error("idle_timeout", f"nothing received for {timeout:g} s", codes.CLOSE_NORMAL)

    # ---- draining: move the client to another replica -------------------------------------------
    def ask_to_reconnect(self, within_s: float) -> None:
        """Close with 1012 in the pause after the next result, or after `within_s` at the latest."""
        self._reconnect_by = time.monotonic() + within_s
        self._reconnect.set()

    def _may_move_now(self) -> bool:
        # Right after a result the speaker has just paused (the VAD saw max_end_silence_ms of silence).
        # Any other "idle" moment may be the start of speech the VAD has not reported yet, and closing
        # then would cut that utterance in two.
        if self.stream is None or (self.stream.idle and self._answered_since_asked):
            return True
        return time.monotonic() >= self._reconnect_by

    async def _move_client(self) -> None:
        """Send every result owed (an open utterance is cut and transcribed), then 1012 with how much
        audio was taken: frames the client sent after that were never read."""
        received_ms = 0
        if self.stream is not None:
            received_ms = self.stream.timeline.received_ms
            await self.finish_stream()
        self.metrics.session_reconnect(self.protocol)
        logger.info("session %s: asked to reconnect (ingress replica stopping) after %d ms of audio",
                    self.session_id, received_ms)  # fmt: skip
        frame = self.render_reconnect(DRAINING.message, received_ms)
        await self.close_with_error(DRAINING.code, DRAINING.message, DRAINING.close_code, frame)

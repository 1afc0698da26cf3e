"""One Xiaozhi device connection (`protocols/xiaozhi.py` holds the pure parts).

Order of business: connection parameters and authentication first (a refused device gets
an error frame and close 1008, before any session or model work), then `hello`, then Opus
audio and `listen` / `abort` control. One `stt` per utterance.
"""

import asyncio
import logging

from serve_app.audio import AudioFormatError
from serve_app.auth import DeviceAuth
from serve_app.messages import UtteranceResult
from serve_app.opus import OpusDecoder
from serve_app.pipeline import RecognitionOptions
from serve_app.protocols import xiaozhi
from serve_app.protocols.errors import ProtocolError
from serve_app.stream_handler import (
    CLOSE_POLICY,
    CLOSE_PROTOCOL_ERROR,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
    StreamHandler,
)

logger = logging.getLogger("ray.serve")

FATAL = {
    "frame_too_large": CLOSE_TOO_BIG,
    "unsupported_audio": CLOSE_UNSUPPORTED_DATA,
    "bad_protocol_version": CLOSE_PROTOCOL_ERROR,
    "hello_timeout": CLOSE_PROTOCOL_ERROR,
}


class XiaozhiStream(StreamHandler):
    protocol = "xiaozhi"

    def __init__(self, ws, pipeline, session_id: str, auth: DeviceAuth):
        super().__init__(ws, pipeline, session_id)
        self.auth = auth
        self.params: xiaozhi.ConnectParams | None = None
        self.decoder: OpusDecoder | None = None
        self.bad_packets = 0

    def render_error(self, code: str, message: str) -> str:
        return xiaozhi.render_error(self.session_id, code, message)

    async def serve(self) -> None:
        try:
            self.params = xiaozhi.connect_params(self.ws.headers, self.ws.query_params)
        except ProtocolError as exc:
            await self.close_with_error(exc.code, str(exc), FATAL[exc.code])
            return
        decision = self.auth.check(self.params)
        if not decision.ok:
            logger.warning("xiaozhi device %s refused: %s", self.params.device_id, decision.reason)
            self.pipeline.metrics.session_rejected(self.protocol, "unauthorized")
            await self.close_with_error("unauthorized", decision.reason, CLOSE_POLICY)
            return
        if not await self._await_hello():
            return
        while True:
            try:
                await self._handle(await self.receive())
            except ProtocolError as exc:
                if exc.code in FATAL:
                    await self.close_with_error(exc.code, str(exc), FATAL[exc.code])
                    return
                await self.report(exc)

    async def _await_hello(self) -> bool:
        """Until the device's hello: answer it, or explain what is missing. False if closed."""
        timeout = self.pipeline.settings.xiaozhi.hello_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                message = await asyncio.wait_for(self.receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                await self.close_with_error("hello_timeout", f"no hello within {timeout:g} s", FATAL["hello_timeout"])
                return False
            try:
                if message.get("text") is None:
                    raise ProtocolError("hello_required", "send hello before audio")
                parsed = xiaozhi.parse_text(message["text"])
                if not isinstance(parsed, xiaozhi.Hello):
                    raise ProtocolError("hello_required", "send hello before anything else")
            except ProtocolError as exc:
                if exc.code in FATAL:
                    await self.close_with_error(exc.code, str(exc), FATAL[exc.code])
                    return False
                await self.report(exc)
                continue
            await self.send(xiaozhi.render_hello(self.session_id, self.pipeline.settings.xiaozhi.hello_audio_params))
            self.decoder = OpusDecoder()
            self.start_runner(RecognitionOptions(speaker_group=self.params.device_id))  # a device's household
            logger.info("xiaozhi session %s: device %s, protocol v%d, %s Hz opus %d ms frames",
                        self.session_id, self.params.device_id, self.params.protocol_version,
                        parsed.sample_rate, parsed.frame_duration)  # fmt: skip
            return True

    async def _handle(self, message: dict) -> None:
        if message.get("bytes") is not None:
            frame = xiaozhi.parse_binary(
                message["bytes"], self.params.protocol_version, self.pipeline.settings.ingress.max_frame_bytes
            )
            if frame.kind == "json":
                self.count_control()
                await self._control(xiaozhi.parse_text(frame.payload.decode("utf-8", errors="replace")))
                return
            try:
                pcm = self.decoder.decode(frame.payload)
            except AudioFormatError as exc:
                self.bad_packets += 1
                raise ProtocolError("bad_audio", f"{exc}; packet dropped") from None
            await self.runner.push(pcm)
            return
        await self._control(xiaozhi.parse_text(message.get("text") or ""))

    async def _control(self, message: xiaozhi.ControlMessage) -> None:
        runner = self.runner
        if isinstance(message, xiaozhi.Listen):
            if message.state == "start":
                if message.mode == "manual":
                    runner.begin_utterance()
                else:
                    runner.manual = False
            elif message.state == "stop":
                runner.end_utterance()
            else:  # detect: the device heard its wake word; nothing to transcribe yet
                logger.info("xiaozhi session %s: wake word %r", self.session_id, message.text)
        elif isinstance(message, xiaozhi.Abort):
            runner.abort()
        elif isinstance(message, xiaozhi.Hello):
            await self.send(xiaozhi.render_hello(self.session_id, self.pipeline.settings.xiaozhi.hello_audio_params))

    async def on_result(self, result: UtteranceResult) -> None:
        await self.send(xiaozhi.render_stt(self.session_id, result))

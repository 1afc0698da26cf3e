"""One WebSocket of the plain JSON protocol (`protocols/plain.py` holds the pure parts)."""

import numpy as np

from serve_app.audio import StreamResampler
from serve_app.messages import UtteranceResult
from serve_app.pipeline import RecognitionOptions, StreamRunner
from serve_app.protocols import plain
from serve_app.protocols.errors import ProtocolError
from serve_app.stream_handler import CLOSE_NORMAL, CLOSE_TOO_BIG, CLOSE_UNSUPPORTED_DATA, StreamHandler

FATAL_PROTOCOL_ERRORS = {"frame_too_large": CLOSE_TOO_BIG, "bad_audio": CLOSE_UNSUPPORTED_DATA}


class PlainStream(StreamHandler):
    protocol = "plain"

    async def serve(self) -> None:
        self.start = plain.StartMessage()
        self.resample = StreamResampler(self.start.sample_rate)
        await self._send_ready()
        while await self._handle(await self.receive()):
            pass

    async def _handle(self, message: dict) -> bool:
        """Handle one frame; False when the connection is over."""
        try:
            if message.get("bytes") is not None:
                pcm = plain.parse_audio(message["bytes"], self.pipeline.settings.ingress.max_frame_bytes)
                await self._runner().push(self.resample(pcm))
                return True
            parsed = plain.parse_text(message.get("text") or "")
            if isinstance(parsed, plain.StartMessage):
                if self.runner is not None:
                    raise ProtocolError("bad_order", "'start' must come before any audio")
                self.start, self.resample = parsed, StreamResampler(parsed.sample_rate)
                await self._send_ready()
                return True
            await self._finish()
            return False
        except ProtocolError as exc:
            if exc.code in FATAL_PROTOCOL_ERRORS:
                await self.close_with_error(exc.code, str(exc), FATAL_PROTOCOL_ERRORS[exc.code])
                return False
            await self.report(exc)
            return True

    def _runner(self) -> StreamRunner:
        if self.runner is None:
            s = self.start
            self.start_runner(RecognitionOptions(s.language, s.itn, s.return_embedding, s.speaker_group))
        return self.runner

    async def _finish(self) -> None:
        runner = self._runner()
        tail = self.resample(np.zeros(0, dtype=np.int16), last=True)
        if len(tail):
            await runner.push(tail)
        count, replays = await self.finish_runner()
        await self.send(plain.render_done(count, replays))
        await self.ws.close(CLOSE_NORMAL)

    async def _send_ready(self) -> None:
        label, chunk_ms = self.pipeline.models_label, self.pipeline.settings.ingress.vad_chunk_ms
        await self.send(plain.render_ready(self.session_id, self.start, label, chunk_ms))

    async def on_result(self, result: UtteranceResult) -> None:
        await self.send(plain.render_result(result))

    def render_error(self, code: str, message: str) -> str:
        return plain.render_error(code, message)

    def render_reconnect(self, message: str, received_ms: int) -> str:
        return plain.render_reconnect(message, received_ms)

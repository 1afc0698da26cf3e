"""One FunASR-runtime-protocol connection (`protocols/funasr.py` holds the pure parts).

FunASR clients may stream several files over one connection: config, audio, end; config,
audio, end. Each config starts a new stream (and session id); each end is answered once
every segment's result is out, with `is_final` and `is_end`.
"""

import numpy as np

from serve_app.audio import StreamResampler
from serve_app.messages import UtteranceResult
from serve_app.pipeline import RecognitionOptions
from serve_app.protocols import funasr
from serve_app.protocols.errors import ProtocolError
from serve_app.protocols.plain import parse_audio
from serve_app.stream_handler import CLOSE_TOO_BIG, CLOSE_UNSUPPORTED_DATA, StreamHandler

FATAL = {"frame_too_large": CLOSE_TOO_BIG, "bad_audio": CLOSE_UNSUPPORTED_DATA}


class FunasrStream(StreamHandler):
    protocol = "funasr"

    def __init__(self, ws, pipeline, session_id: str):
        super().__init__(ws, pipeline, session_id)
        self.base_id = session_id
        self.streams = 0
        self.config: funasr.Config | None = None
        self.resample = StreamResampler(16000)
        self.online_sent: dict[int, str] = {}  # interim text already sent, per utterance index

    def render_error(self, code: str, message: str) -> str:
        return funasr.render_error(code, message)

    async def serve(self) -> None:
        while True:
            message = await self.receive()
            try:
                if message.get("bytes") is not None:
                    pcm = parse_audio(message["bytes"], self.pipeline.settings.ingress.max_frame_bytes)
                    if self.runner is None:
                        self._start(self.config or funasr.Config())
                    await self.runner.push(self.resample(pcm))
                    continue
                parsed = funasr.parse_text(message.get("text") or "", configured=self.config is not None)
                if isinstance(parsed, funasr.Config):
                    if self.runner is not None:
                        await self._end()  # a new file on the same connection closes the last one
                    self.config = parsed
                    continue
                await self._end()
            except ProtocolError as exc:
                if exc.code in FATAL:
                    await self.close_with_error(exc.code, str(exc), FATAL[exc.code])
                    return
                await self.report(exc)

    def _start(self, config: funasr.Config) -> None:
        self.config = config
        self.streams += 1
        self.session_id = self.base_id if self.streams == 1 else f"{self.base_id}-{self.streams}"
        self.resample = StreamResampler(config.audio_fs)
        self.online_sent = {}
        interim = config.mode in ("online", "2pass")
        self.start_runner(
            RecognitionOptions(use_itn=config.itn, speaker_group=config.speaker_group),
            on_interim=self._on_interim if interim else None,
            interim_interval_ms=self.pipeline.settings.funasr.interim_interval_ms,
        )

    async def _end(self) -> None:
        if self.runner is None:  # end with no audio: still answer, clients wait for it
            self._start(self.config or funasr.Config())
        tail = self.resample(np.zeros(0, dtype=np.int16), last=True)
        if len(tail):
            await self.runner.push(tail)
        count, _ = await self.finish_runner()
        await self.send(funasr.render_end(self.config, count))

    async def _on_interim(self, index: int, text: str) -> None:
        delta = funasr.text_delta(self.online_sent.get(index, ""), text)
        if delta:
            self.online_sent[index] = self.online_sent.get(index, "") + delta
            await self.send(funasr.render_interim(self.config, delta))

    async def on_result(self, result: UtteranceResult) -> None:
        await self.send(funasr.render_final(self.config, result, self.online_sent.pop(result.index, "")))

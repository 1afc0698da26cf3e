"""Fakes of what the Ingress talks to, each written once: a clock moved by hand, a Serve response that
answers when told, a WebSocket whose client side is a queue, VADHosts and model calls that answer as a
test needs, and an HTTP request with a multipart body."""

from __future__ import annotations

import asyncio
import json

import numpy as np
from starlette.requests import Request

from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.stream import ModelCalls, UtteranceStreams
from speech_serve.messages import SpeakerInfo, UtteranceResult, VadEvent, VadFeedResult, VadItem
from speech_serve.settings import AppSettings

GONE = {"type": "websocket.disconnect", "code": 1000}  # the client has left


def vec(*xs: float, dim: int = 4) -> np.ndarray:
    """A small embedding with these leading components (voiceprint tests)."""
    v = np.zeros(dim, dtype=np.float32)
    v[: len(xs)] = xs
    return v


class ManualClock:
    """A clock the test moves by hand (`clock.now += 1.5`)."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class PendingResponse:
    """A Serve response from a replica that took the call and answers only when told (`future`), or
    never; records whether it was cancelled. Appends itself to `log`."""

    def __init__(self, log: list):
        self.future = asyncio.get_running_loop().create_future()
        self.cancelled = False
        log.append(self)

    def __await__(self):
        return self.future.__await__()

    def cancel(self) -> None:
        self.cancelled = True


class MemoryWebSocket:
    """The slice of Starlette's WebSocket the handlers use; the client side is a queue."""

    def __init__(self, headers: dict | None = None, query: dict | None = None, path: str = "/"):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent: list[dict] = []
        self.closed: tuple[int, str] | None = None
        self.headers, self.query_params = headers or {}, query or {}
        self.scope = {"path": path, "query_string": b"", "subprotocols": []}

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send_text(self, text: str) -> None:
        self.sent.append(json.loads(text))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = (code, reason)


def text(data: str | dict) -> dict:
    """A text frame as the socket hands it over."""
    return {"type": "websocket.receive", "text": data if isinstance(data, str) else json.dumps(data)}


def binary(data: bytes) -> dict:
    return {"type": "websocket.receive", "bytes": data}


class HungVad:
    """A VADHost whose batched calls answer only when the test says so (`calls`: items, response)."""

    def __init__(self):
        self.calls: list[tuple[list[VadItem], PendingResponse]] = []
        responses: list[PendingResponse] = []

        def remote(_self, lane, items):
            response = PendingResponse(responses)
            self.calls.append((items, response))
            return response

        self.feed_many = type("Method", (), {"remote": remote})()


class QuietVad:
    """A VADHost that answers at once and hears no speech."""

    def __init__(self):
        self.chunks = 0
        self.items: list = []  # every VadItem received, in order (a close has no chunk)

        async def remote(lane, items):
            self.chunks += len(items)
            self.items += items
            return [VadFeedResult(events=[]) for _ in items]

        self.feed_many = type("Method", (), {"remote": staticmethod(remote)})()


class SlowModels:
    """The stream's model calls: a VAD that finds a short utterance in every chunk, and recognitions
    that wait for `release`."""

    def __init__(self):
        self.release = asyncio.Event()
        self.in_flight = self.most = 0

    async def feed_vad(self, sid, timeline, chunk):
        end = chunk.start_ms + 200
        return VadFeedResult(events=[VadEvent("start", chunk.start_ms), VadEvent("end", end)]), 0

    async def recognise(self, sid, utt, options):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await self.release.wait()
        self.in_flight -= 1
        result = UtteranceResult(
            session_id=sid, index=utt.index, start_ms=utt.start_ms, end_ms=utt.end_ms, text="t", language="en",
            emotion=None, event=None, raw_text="t", speaker=SpeakerInfo(), models="test",
        )  # fmt: skip
        return result, None

    def close_vad_later(self, sid, after=None):
        pass


def connection(cls, ws, settings: AppSettings | None = None, session_id: str = "s1", *extra, vad=None, asr=None,
               speaker=None):  # fmt: skip
    """A connection of protocol `cls` over `ws` with only the deployments given behind it (none is fine
    as long as no audio is sent)."""
    settings = settings or AppSettings()
    metrics = IngressMetrics()
    streams = UtteranceStreams(ModelCalls(vad, asr, speaker, settings), settings, metrics, "test")
    return cls(ws, session_id, streams, settings.limits, metrics, *extra)


BOUNDARY = "speechserveboundary"


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    for name, filename, data in files:
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        parts.append(head.encode() + b"Content-Type: audio/wav\r\n\r\n" + data + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def request(body: bytes, content_type: str = f"multipart/form-data; boundary={BOUNDARY}") -> Request:
    """An HTTP request whose body arrives in 64 KiB pieces."""
    chunks = [body[i : i + 64 * 1024] for i in range(0, len(body), 64 * 1024)] or [b""]

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": headers}
    return Request(scope, receive)

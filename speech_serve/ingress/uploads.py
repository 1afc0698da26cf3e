"""Uploads (files to transcribe, enrolment recordings): multipart bodies held in memory only, and the
gates that bound how many one Ingress replica takes at once.

Starlette (which FastAPI's `File()` / `UploadFile` parameters use) spools every file part into a
`SpooledTemporaryFile` that rolls over to a temporary file on disk past 1 MiB. Here the spool limit
is raised to the upload limit, and a file that would pass the limit is refused (413) before its
bytes are written, so the spool never rolls over: uploaded audio never touches the disk. Memory per
request is bounded by max_files x max_file_bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TypeVar

from fastapi import HTTPException
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from speech_serve.settings import UploadSettings

T = TypeVar("T")

MAX_FORM_FIELDS = 32  # text fields per form: ours use 4; room for OpenAI clients' extras
MAX_FIELD_BYTES = 64 * 1024  # one text field (a name, a language code)


class UploadError(ValueError):
    """A bad upload: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class InMemoryMultiPartParser(MultiPartParser):
    def __init__(self, headers: Headers, stream, *, max_file_bytes: int, max_files: int):
        super().__init__(
            headers, stream, max_files=max_files, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
        )
        self.spool_max_size = max_file_bytes  # rolls over only past this, which on_part_data never allows
        self.max_file_bytes = max_file_bytes
        self._file_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._file_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self._file_bytes += end - start
            if self._file_bytes > self.max_file_bytes:
                raise UploadError(413, f"each file must be at most {self.max_file_bytes} bytes")
        super().on_part_data(data, start, end)


async def read_form(request: Request, max_file_bytes: int, max_files: int, stream=None) -> FormData:
    """The request's form, files in memory. Raises UploadError."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            parser = InMemoryMultiPartParser(
                request.headers, stream or request.stream(), max_file_bytes=max_file_bytes, max_files=max_files
            )
            return await parser.parse()
        # url-encoded or no body: no file parts, so nothing to spool
        return await request.form(max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES)
    except MultiPartException as exc:
        raise UploadError(400, exc.message) from None


class BodyPace:
    """When the rest of a body must have arrived: within `timeout_s` in all, and past the first
    `grace_s` at `min_bytes_per_s` on average, so a client that trickles its body is let go in
    seconds, not at the end of the timeout."""

    def __init__(self, timeout_s: float, min_bytes_per_s: float | None, grace_s: float, started: float):
        self.timeout_s, self.min_rate, self.grace_s, self.started = timeout_s, min_bytes_per_s, grace_s, started
        self.received = 0

    def deadline(self) -> float:
        last = self.started + self.timeout_s
        if not self.min_rate:
            return last
        return min(last, self.started + max(self.grace_s, self.received / self.min_rate))

    def too_slow(self, now: float) -> bool:
        """At the deadline: cut by the pace, not by the whole timeout."""
        return now < self.started + self.timeout_s


async def read_upload_form(request: Request, limits: UploadSettings, max_files: int) -> FormData:
    """`read_form` (up to `max_files` of `limits.max_bytes`), with a bad upload answered as its HTTP
    error, and a body that does not keep its `BodyPace` as 408."""
    timeout_s, min_bytes_per_s = limits.body_timeout_s, limits.min_body_bytes_per_s
    loop = asyncio.get_running_loop()
    pace = BodyPace(timeout_s, min_bytes_per_s, limits.body_grace_s, loop.time())
    try:
        async with asyncio.timeout_at(pace.deadline()) as deadline:

            async def paced():
                async for chunk in request.stream():
                    pace.received += len(chunk)
                    deadline.reschedule(pace.deadline())
                    yield chunk

            return await read_form(request, limits.max_bytes, max_files, paced())
    except UploadError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except TimeoutError:
        if pace.too_slow(loop.time()):
            rate = pace.received / max(loop.time() - pace.started, 1e-3)
            raise HTTPException(408, f"the upload's body arrives at {rate:.0f} bytes/s, under the "
                                     f"{min_bytes_per_s:g} bytes/s this server needs") from None  # fmt: skip
        raise HTTPException(408, f"the upload's body did not arrive within {timeout_s:g} s") from None


def text_field(form: FormData, name: str, default: str | None = None, required: bool = False) -> str | None:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise UploadError(422, f"form field {name!r} must be text, not a file")
    if value is None and required:
        raise UploadError(422, f"missing form field {name!r}")
    return default if value is None else value


def file_fields(form: FormData, name: str) -> list[UploadFile]:
    files = [v for v in form.getlist(name) if isinstance(v, UploadFile)]
    if not files:
        raise UploadError(422, f"missing file field {name!r}: send the audio as multipart/form-data")
    return files


class Slots:
    """At most `limit` holders at once. `take()` answers at once, never queues: a waiting upload
    would hold its body in memory, and its client would not know why nothing happens."""

    def __init__(self, limit: int, retry_after_s: int = 5, busy: str = "uploads"):
        self.limit, self.retry_after_s, self.busy = limit, retry_after_s, busy
        self.held = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        """One slot for the block, or HTTP 503 with Retry-After at once."""
        self.check()
        self.held += 1
        try:
            yield
        finally:
            self.held -= 1

    def check(self) -> None:
        """HTTP 503 with Retry-After when every slot is held."""
        if self.held >= self.limit:
            raise HTTPException(
                503,
                f"this server is handling {self.limit} {self.busy} already; retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )


class UploadGate:
    """How many uploads of one kind (transcriptions; enrolments have a gate of their own, so devices
    never hold the admin's) one Ingress replica takes, in two steps. Up to `receiving` bodies arrive
    at once, each held to `BodyPace`; only a whole body takes one of `working` (its decode and
    models). A client trickling its body holds a receiving slot for seconds and never a working one."""

    def __init__(self, working: int, receiving: int, retry_after_s: int, what: str = "uploads"):
        self.working = Slots(working, retry_after_s, what)
        self.receiving = Slots(receiving, retry_after_s, f"{what} arriving")

    @asynccontextmanager
    async def admit(self, receive: Callable[[], Awaitable[T]]) -> AsyncIterator[T]:
        """`receive()` (the body) under a receiving slot, then the block under a working slot; 503
        before the body when the working slots are full already."""
        self.working.check()
        with self.receiving.hold():
            received = await receive()
        with self.working.hold():
            yield received


def upload_gates(limits: UploadSettings) -> tuple[UploadGate, UploadGate]:
    """(devices' file transcriptions, the admin's enrolments): a gate each, so neither holds the other."""
    receiving, retry_after_s = limits.max_receiving, limits.retry_after_s
    return (UploadGate(limits.max_concurrent, receiving, retry_after_s, "uploads"),
            UploadGate(limits.max_concurrent_enrolments, receiving, retry_after_s, "enrolments"))  # fmt: skip

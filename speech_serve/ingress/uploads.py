"""Uploads (files to transcribe, enrolment recordings): multipart bodies held in memory only, and the
slots that bound how many one Ingress replica takes at once.

Starlette (which FastAPI's `File()` / `UploadFile` parameters use) spools every file part into a
`SpooledTemporaryFile` that rolls over to a temporary file on disk past 1 MiB. Here the spool limit
is raised to the upload limit, and a file that would pass the limit is refused (413) before its
bytes are written, so the spool never rolls over: uploaded audio never touches the disk. Memory per
request is bounded by max_files x max_file_bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import HTTPException
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

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


async def read_form(request: Request, max_file_bytes: int, max_files: int) -> FormData:
    """The request's form, files in memory. Raises UploadError."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            parser = InMemoryMultiPartParser(
                request.headers, request.stream(), max_file_bytes=max_file_bytes, max_files=max_files
            )
            return await parser.parse()
        # url-encoded or no body: no file parts, so nothing to spool
        return await request.form(max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES)
    except MultiPartException as exc:
        raise UploadError(400, exc.message) from None


async def read_upload_form(request: Request, max_file_bytes: int, max_files: int, timeout_s: float) -> FormData:
    """`read_form`, with a bad upload answered as its HTTP error, and a body that has not all
    arrived within `timeout_s` as 408."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read_form(request, max_file_bytes, max_files)
    except UploadError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except TimeoutError:
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
    """At most `limit` holders at once (uploads on one Ingress replica). `take()` answers at once,
    never queues: a waiting upload would hold its body in memory, and its client would not know
    why nothing happens."""

    def __init__(self, limit: int, retry_after_s: int = 5):
        self.limit, self.retry_after_s = limit, retry_after_s
        self.held = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        """One slot for the block, or HTTP 503 with Retry-After at once."""
        if not self.take():
            raise HTTPException(
                503,
                f"this server is handling {self.limit} uploads already; retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        try:
            yield
        finally:
            self.give()

    def take(self) -> bool:
        if self.held >= self.limit:
            return False
        self.held += 1
        return True

    def give(self) -> None:
        self.held -= 1

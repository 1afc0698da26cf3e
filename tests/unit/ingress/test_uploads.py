"""Uploads stay in memory: no temporary file on disk, whatever the size up to the limit.

Starlette's own parser spools a file part to disk past 1 MiB; the control test shows the
detector here sees that happen, so the tests of ours can fail."""

import asyncio
import os
import sys

import pytest
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

from speech_serve.ingress.uploads import UploadError, file_fields, read_form, text_field
from speech_serve.settings import UploadSettings
from tests.support.fakes import BOUNDARY, multipart, request

SPOOL_THRESHOLD = MultiPartParser.spool_max_size  # starlette's 1 MiB
BIG = 3 * 1024 * 1024  # over the threshold
_temp_files: list | None = None  # set while a test records (any thread: Starlette writes in a threadpool)


def _audit(event: str, args: tuple) -> None:
    """Every temporary file a process makes passes here: tempfile's mkstemp/mkdtemp, or an
    unnamed O_TMPFILE open (what TemporaryFile and a rolled-over spool use on Linux)."""
    if _temp_files is None:
        return
    if event in ("tempfile.mkstemp", "tempfile.mkdtemp"):
        _temp_files.append((event, args))
    elif event == "open" and isinstance(args[2], int) and hasattr(os, "O_TMPFILE"):
        if args[2] & os.O_TMPFILE == os.O_TMPFILE:
            _temp_files.append((event, args))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only inside `recording`


class recording:
    def __enter__(self) -> list:
        global _temp_files
        _temp_files = []
        return _temp_files

    def __exit__(self, *exc) -> None:
        global _temp_files
        _temp_files = None






def audio(n: int) -> bytes:
    return bytes(range(256)) * (n // 256) + bytes(n % 256)


def trickling_request(first: bytes) -> Request:
    """A client that sends the start of its body, then nothing more (a slow-loris upload)."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": first, "more_body": True}
        await asyncio.Event().wait()  # never

    headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": headers}, receive)


def test_control_starlettes_own_parser_spools_a_big_upload_to_disk():
    body = multipart({"model": "x"}, [("file", "a.wav", audio(BIG))])
    req = request(body)

    async def parse():
        form = await MultiPartParser(req.headers, req.stream()).parse()
        rolled = form["file"].file._rolled
        await form.close()
        return rolled

    with recording() as made:
        rolled = asyncio.run(parse())
    assert rolled and made, "the detector must see the spool roll over to a temporary file"


def test_an_upload_over_the_spool_threshold_stays_in_memory():
    data = audio(BIG)
    body = multipart({"model": "x", "language": "en"}, [("file", "a.wav", data)])

    async def parse():
        form = await read_form(request(body), max_file_bytes=BIG, max_files=1)
        (upload,) = file_fields(form, "file")
        got = await upload.read(), upload.file._rolled, text_field(form, "language")
        await form.close()
        return got

    with recording() as made:
        got, rolled, language = asyncio.run(parse())
    assert BIG > SPOOL_THRESHOLD and got == data and language == "en"
    assert not rolled and made == []


def test_several_files_each_in_memory_and_each_checked():
    files = [("files", f"{i}.wav", audio(2 * 1024 * 1024 + i)) for i in range(3)]
    with recording() as made:
        form = asyncio.run(read_form(request(multipart({"name": "alice"}, files)), max_file_bytes=BIG, max_files=3))
    assert [u.size for u in file_fields(form, "files")] == [len(f[2]) for f in files] and made == []
    with pytest.raises(UploadError, match="Too many files") as err:
        asyncio.run(read_form(request(multipart({}, files)), max_file_bytes=BIG, max_files=2))
    assert err.value.status == 400


def test_a_file_over_the_limit_is_refused_before_it_reaches_the_disk():
    body = multipart({}, [("file", "big.wav", audio(BIG + 1))])
    with recording() as made, pytest.raises(UploadError, match=f"at most {BIG} bytes") as err:
        asyncio.run(read_form(request(body), max_file_bytes=BIG, max_files=1))
    assert err.value.status == 413 and made == []


def test_forms_without_files_and_missing_fields():
    form = asyncio.run(
        read_form(request(b"name=bob", "application/x-www-form-urlencoded"), max_file_bytes=10, max_files=1)
    )
    assert text_field(form, "name") == "bob" and text_field(form, "group", "default") == "default"
    for call, status in (
        (lambda: file_fields(form, "files"), 422),
        (lambda: text_field(form, "x", required=True), 422),
    ):
        with pytest.raises(UploadError) as err:
            call()
        assert err.value.status == status
    with_file = asyncio.run(read_form(request(multipart({}, [("name", "n.txt", b"x")])), 10, 1))
    with pytest.raises(UploadError, match="must be text"):
        text_field(with_file, "name")
    with pytest.raises(UploadError) as err:
        asyncio.run(read_form(request(b"--nope", f"multipart/form-data; boundary={BOUNDARY}"), 10, 1))
    assert err.value.status == 400


def test_an_upload_body_that_stops_arriving_is_answered_408():
    from fastapi import HTTPException

    from speech_serve.ingress.uploads import read_upload_form

    body = multipart({"model": "x"}, [("file", "a.wav", audio(4096))])
    with pytest.raises(HTTPException) as raised:
        limits = UploadSettings(max_bytes=BIG, body_timeout_s=0.05)
        asyncio.run(read_upload_form(trickling_request(body[:100]), limits, max_files=1))
    assert raised.value.status_code == 408 and "did not arrive" in raised.value.detail


def test_slots_answer_503_with_retry_after_at_once_and_are_given_back():
    from fastapi import HTTPException

    from speech_serve.ingress.uploads import Slots

    slots = Slots(2, retry_after_s=7)
    with slots.hold(), slots.hold():
        with pytest.raises(HTTPException) as raised, slots.hold():
            pass
        assert raised.value.status_code == 503 and raised.value.headers == {"Retry-After": "7"}
    with slots.hold():  # given back on the way out, errors included
        assert slots.held == 1
    assert slots.held == 0


def test_the_admins_enrolments_have_a_gate_apart_from_the_devices_uploads():
    """One upload cap shared by transcriptions and enrolment: devices holding it (two trickling
    clients did, for 120 s) refused the admin's enrolments with 503."""
    from fastapi import HTTPException

    from speech_serve.ingress.uploads import upload_gates

    async def idle():
        return None

    async def scenario():
        files, enrolments = upload_gates(UploadSettings(max_concurrent=2))
        async with files.admit(idle), files.admit(idle):
            with pytest.raises(HTTPException) as refused:
                async with files.admit(idle):
                    pass
            async with enrolments.admit(idle):  # the admin's enrolment goes on
                return refused.value.status_code

    assert asyncio.run(scenario()) == 503

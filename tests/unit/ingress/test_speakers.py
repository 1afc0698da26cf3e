"""The admin API's enrolments (speakers.py): uploads checked, and a 503 while the store is unavailable."""

import pytest

from speech_serve.ingress.speakers import EnrollmentError, decode_uploads
from speech_serve.settings import VoiceprintSettings
from speech_serve.voiceprints import open_store
from tests.support.audio import FIXTURES


def test_enrolment_uploads_are_checked():
    settings = VoiceprintSettings(min_enroll_s=1.0, max_enroll_s=5.0, max_enroll_files=2)
    good = (FIXTURES / "voices" / "alice_enroll_1.wav").read_bytes()
    assert len(decode_uploads([("a.wav", good)], settings)) == 1
    cases = [
        ([], 400, "at least one"),
        ([("a.wav", good)] * 3, 400, "at most 2"),
        ([("x.wav", b"not audio")], 400, "x.wav: cannot decode"),
        ([("short.wav", good[: 44 + 16000])], 400, "at least 1 s"),
        ([("long.wav", (FIXTURES / "voices" / "three_speakers.wav").read_bytes())], 413, "at most 5 s"),
    ]
    for files, status, text in cases:
        with pytest.raises(EnrollmentError) as err:
            decode_uploads(files, settings)
        assert err.value.status == status and text in str(err.value)


def test_the_admin_api_answers_503_while_the_store_is_unavailable(tmp_path):
    import asyncio
    import json

    from starlette.requests import Request

    from speech_serve.ingress.routes import store_unavailable

    path = tmp_path / "vp.sqlite3"
    path.write_bytes(b"not a database" * 100)
    request = Request({"type": "http", "method": "GET", "path": "/v1/speakers", "headers": [], "query_string": b""})
    try:
        open_store(str(path)).list()
    except Exception as exc:
        response = asyncio.run(store_unavailable(request, exc))
    assert response.status_code == 503 and "cannot be opened" in json.loads(response.body)["detail"]


def test_with_enrolment_off_every_enrolment_answers_501_and_reads_nothing():
    """Where the store is not shared (SQLite on several pods) an enrolment answered 201 and reached
    no other host; with voiceprints.enrolment false it says why instead, before its body is read."""
    import asyncio

    from fastapi import HTTPException

    from speech_serve.ingress.speakers import SpeakerAdmin
    from speech_serve.ingress.uploads import upload_gates
    from speech_serve.settings import UploadSettings

    def unread(*_):
        raise AssertionError("the body or the store was touched")

    admin = SpeakerAdmin(None, None, VoiceprintSettings(enrolment=False), UploadSettings(),
                         upload_gates(UploadSettings())[1])  # fmt: skip
    request = type("Unread", (), {"form": unread, "stream": unread, "json": unread, "body": unread})()
    for call in (admin.enroll(request), admin.reenroll(request, "spk-1"), admin.enroll_from_session(request, {})):
        with pytest.raises(HTTPException) as refused:
            asyncio.run(call)
        assert refused.value.status_code == 501 and "voiceprints.enrolment" in refused.value.detail

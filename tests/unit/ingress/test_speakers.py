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

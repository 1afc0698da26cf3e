"""POST /v1/audio/transcriptions (files.py): OpenAI's response shapes, and bounded uploads: a
bad file refused before the models, decoding off the event loop, the replica's upload cap,
segments in flight per upload."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import numpy as np
import pytest
import soundfile as sf
from fastapi import HTTPException

from speech_serve.ingress import files as openai_files
from speech_serve.ingress.auth import DeviceAuth
from speech_serve.ingress.files import FileTranscriptions
from speech_serve.ingress.uploads import Slots
from speech_serve.messages import SpeakerInfo, UtteranceResult
from speech_serve.settings import AppSettings
from tests.support.fakes import multipart, request

FLAC_MAX_RATE = 655_350  # the highest rate a FLAC header can state: the measured bomb's


def flac_silence(rate: int, seconds: float, channels: int = 1) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros((int(rate * seconds), channels), dtype=np.int16), rate, format="FLAC")
    return out.getvalue()


def wav_upload(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(int(rate * seconds), dtype=np.int16), rate, format="WAV", subtype="PCM_16")
    return multipart({"response_format": "json"}, [("file", "a.wav", out.getvalue())])


def result(i: int) -> UtteranceResult:
    return UtteranceResult(
        session_id="f", index=i, start_ms=i * 100, end_ms=i * 100 + 50, text=f"w{i}", language="en",
        emotion=None, event=None, raw_text=f"w{i}", speaker=SpeakerInfo(), models="test",
    )  # fmt: skip


class FakeModels:
    """ModelCalls as the endpoint uses it: `segments` VAD segments, each recognised after
    `release` is set; records the most recognitions in flight at once."""

    models_label = "test"

    def __init__(self, segments: int = 1):
        self.segments = [(i * 100, i * 100 + 50) for i in range(segments)]
        self.release = asyncio.Event()
        self.release.set()
        self.in_flight = self.most_in_flight = 0
        self.segmenting = asyncio.Event()
        self.live: list[bool] = []  # how each segment was recognised: as a stream's utterance, or not

    async def segment(self, pcm, request_id):
        self.segmenting.set()
        await self.release.wait()
        return self.segments

    async def recognise(self, request_id, utt, options, live=True):
        self.live.append(live)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)  # let the others start, if they may
        await asyncio.sleep(0)
        self.in_flight -= 1
        return result(utt.index), None

    __call__ = recognise  # it is the endpoint's Recognition too


def endpoint(models: FakeModels, **uploads) -> FileTranscriptions:
    settings = AppSettings(uploads=uploads)
    slots = Slots(settings.uploads.max_concurrent, settings.uploads.retry_after_s)
    return FileTranscriptions(models, models, DeviceAuth(enabled=False), settings, slots)


def _result(i, text, lang):
    return UtteranceResult(
        session_id="f", index=i, start_ms=i * 1000, end_ms=i * 1000 + 500, text=text, language=lang,
        emotion=None, event=None, raw_text=text, speaker=SpeakerInfo(), models="test",
    )  # fmt: skip


def test_a_file_above_48_khz_gets_http_400_with_the_reason():
    body = multipart({}, [("file", "bomb.flac", flac_silence(FLAC_MAX_RATE, 1.0))])
    with pytest.raises(HTTPException) as err:
        asyncio.run(endpoint(FakeModels())(request(body)))
    assert err.value.status_code == 400 and "48000 Hz" in err.value.detail


def test_the_file_is_decoded_off_the_event_loop(monkeypatch):
    """Decoding a long file takes seconds of CPU: on the event loop it would stall every
    session of the replica."""
    import speech_serve.ingress.files as files

    threads = []
    real = files.decode_file

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(files, "decode_file", recording)
    response = asyncio.run(endpoint(FakeModels())(request(wav_upload())))
    assert response.status_code == 200
    assert threads and threading.main_thread() not in threads


def test_uploads_over_the_replicas_cap_get_503_with_retry_after():
    async def scenario():
        models = FakeModels()
        models.release.clear()  # the first uploads hold their slots in the VAD step
        files = endpoint(models, max_concurrent=2, retry_after_s=7)
        first = [asyncio.create_task(files(request(wav_upload()))) for _ in range(2)]
        while not models.segmenting.is_set():
            await asyncio.sleep(0.01)
        for _ in range(100):  # both past the cap's check (each decodes in a thread first)
            await asyncio.sleep(0.01)
        with pytest.raises(HTTPException) as err:
            await files(request(wav_upload()))
        models.release.set()
        done = await asyncio.gather(*first)
        after = await files(request(wav_upload()))  # a freed slot is usable again
        return err.value, [r.status_code for r in done], after.status_code

    refused, first, after = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers == {"Retry-After": "7"}
    assert "uploads" in refused.detail
    assert first == [200, 200] and after == 200


def test_a_refused_or_failed_upload_frees_its_slot():
    files = endpoint(FakeModels(), max_concurrent=1)
    for _ in range(3):
        with pytest.raises(HTTPException) as err:
            asyncio.run(files(request(multipart({}, [("file", "x.wav", b"not audio")]))))
        assert err.value.status_code == 400
    assert asyncio.run(files(request(wav_upload()))).status_code == 200


def test_segments_in_flight_per_upload_are_capped_and_answered_in_order():
    models = FakeModels(segments=40)
    response = asyncio.run(endpoint(models, max_segments_in_flight=3)(request(wav_upload())))
    assert response.status_code == 200
    assert 1 < models.most_in_flight <= 3
    assert models.live == [False] * 40  # an upload's segments are not a stream's finals (the backlog)
    body = json.loads(response.body)
    assert body["text"] == " ".join(f"w{i}" for i in range(40))


def test_openai_shapes():
    results = [_result(0, "hello", "en"), _result(1, "world", "en")]
    body, media = openai_files.render("json", results, 2.0, "test")
    assert media == "application/json" and json.loads(body) == {"text": "hello world", "models": "test"}
    body, media = openai_files.render("text", results, 2.0, "test")
    assert media.startswith("text/plain") and body == "hello world\n"
    verbose = json.loads(openai_files.render("verbose_json", results, 2.0, "test")[0])
    assert verbose["language"] == "en" and verbose["duration"] == 2.0
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in verbose["segments"]] == [
        (0, 0.0, 0.5, "hello"),
        (1, 1.0, 1.5, "world"),
    ]
    with pytest.raises(openai_files.TranscriptionRequestError, match="srt"):
        openai_files.check_response_format("srt")

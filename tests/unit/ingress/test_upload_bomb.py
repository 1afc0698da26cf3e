"""Uploaded files cannot buy the ingress's time or memory: rates above 48 kHz are refused from
the header, decoding keeps only 16 kHz audio and runs off the event loop, and each Ingress
replica takes a bounded number of uploads, each with a bounded number of segments in flight.

The hostile files are made here with soundfile (FLAC silence: a few kB for seconds of audio at
any rate), not committed."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import tracemalloc

import numpy as np
import pytest
import soundfile as sf
from fastapi import HTTPException

from speech_serve.ingress.audio import decode_file
from speech_serve.ingress.files import FileTranscriptions
from speech_serve.ingress.security import DeviceAuth, Slots
from speech_serve.messages import AudioFormatError, SpeakerInfo, UtteranceResult
from speech_serve.settings import IngressSettings
from tests.unit.ingress.test_security_uploads import multipart, request

FLAC_MAX_RATE = 655_350  # the highest rate a FLAC header can state: the measured bomb's


def flac_silence(rate: int, seconds: float, channels: int = 1) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros((int(rate * seconds), channels), dtype=np.int16), rate, format="FLAC")
    return out.getvalue()


def test_a_file_above_48_khz_is_refused_with_a_clear_message():
    data = flac_silence(FLAC_MAX_RATE, 2.0)  # 1.3 M samples of silence in a few kB
    assert len(data) < 100_000
    with pytest.raises(AudioFormatError, match=r"655350 Hz.*at most 48000 Hz"):
        decode_file(data, max_seconds=1800)


def test_decoding_keeps_16_khz_audio_not_the_files_own_rate():
    """A minute of 48 kHz stereo: the decoder's peak memory is a small multiple of its 16 kHz
    output, not of the 48 kHz stereo input (which is 6x larger)."""
    data = flac_silence(48_000, 60.0, channels=2)
    tracemalloc.start()
    try:
        pcm, duration_s = decode_file(data, max_seconds=1800)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out_bytes = pcm.nbytes
    assert duration_s == pytest.approx(60.0) and abs(len(pcm) - 60 * 16_000) <= 16
    input_bytes = 48_000 * 60 * 2 * 2
    assert peak < 3 * out_bytes + 2_000_000 < input_bytes, (peak, out_bytes)


# ---- the endpoint ---------------------------------------------------------------------------------
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

    async def segment(self, pcm, request_id):
        self.segmenting.set()
        await self.release.wait()
        return self.segments

    async def recognise(self, request_id, utt, options):
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)  # let the others start, if they may
        await asyncio.sleep(0)
        self.in_flight -= 1
        return result(utt.index), None


def endpoint(models: FakeModels, **limits) -> FileTranscriptions:
    settings = IngressSettings(**limits)
    slots = Slots(settings.max_concurrent_uploads, settings.upload_retry_after_s)
    return FileTranscriptions(models, DeviceAuth(enabled=False), settings, slots)


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
        files = endpoint(models, max_concurrent_uploads=2, upload_retry_after_s=7)
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
    files = endpoint(FakeModels(), max_concurrent_uploads=1)
    for _ in range(3):
        with pytest.raises(HTTPException) as err:
            asyncio.run(files(request(multipart({}, [("file", "x.wav", b"not audio")]))))
        assert err.value.status_code == 400
    assert asyncio.run(files(request(wav_upload()))).status_code == 200


def test_segments_in_flight_per_upload_are_capped_and_answered_in_order():
    models = FakeModels(segments=40)
    response = asyncio.run(endpoint(models, max_upload_segments_in_flight=3)(request(wav_upload())))
    assert response.status_code == 200
    assert 1 < models.most_in_flight <= 3
    body = json.loads(response.body)
    assert body["text"] == " ".join(f"w{i}" for i in range(40))

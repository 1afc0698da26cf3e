"""POST /v1/audio/transcriptions (files.py): OpenAI's response shapes, and bounded uploads: a
bad file refused before the models, decoding off the event loop, the replica's upload cap,
segments in flight per upload."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
from fastapi import HTTPException

from speech_serve.ingress import files as openai_files
from speech_serve.ingress.auth import DeviceAuth
from speech_serve.ingress.files import FileTranscriptions, cut_into_segments
from speech_serve.ingress.stream import ModelCalls
from speech_serve.ingress.uploads import UploadGate
from speech_serve.messages import SpeakerInfo, UtteranceResult
from speech_serve.settings import AppSettings
from tests.support.fakes import multipart, request

FLAC_MAX_RATE = 655_350  # the highest rate a FLAC header can state: the measured bomb's


def flac_silence(rate: int, seconds: float, channels: int = 1) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros((int(rate * seconds), channels), dtype=np.int16), rate, format="FLAC")
    return out.getvalue()


def wav_body(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros(int(rate * seconds), dtype=np.int16), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def wav_upload(seconds: float = 1.0, rate: int = 16_000) -> bytes:
    return multipart({"response_format": "json"}, [("file", "a.wav", wav_body(seconds, rate))])


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
    u = settings.uploads
    gate = UploadGate(u.max_concurrent, u.max_receiving, u.retry_after_s)
    return FileTranscriptions(models, models, DeviceAuth(enabled=False), settings, gate,
                              cut=lambda calls, pcm, request_id, piece_ms: models.segment(pcm, request_id))  # fmt: skip


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


def trickler(body: bytes) -> tuple:
    """A request that sends the start of its body, then holds on; `go.set()` sends the rest."""
    from starlette.requests import Request

    from tests.support.fakes import BOUNDARY

    go, sent = asyncio.Event(), [False]

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body[:100], "more_body": True}
        await go.wait()
        return {"type": "http.request", "body": body[100:], "more_body": False}

    headers = [(b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode())]
    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": headers}
    return Request(scope, receive), go


def test_clients_trickling_their_bodies_hold_no_working_slot_and_are_let_go_at_the_minimum_rate():
    """Slots were taken before the body: two clients sending a few bytes a minute held both of a
    replica's upload slots for body_timeout_s (120 s), and every other upload got 503 meanwhile."""

    async def scenario():
        files = endpoint(FakeModels(), max_concurrent=2, max_receiving=4, body_grace_s=0.3,
                         min_body_bytes_per_s=100_000)  # fmt: skip
        slow = [trickler(wav_upload()) for _ in range(2)]
        held = [asyncio.create_task(files(req)) for req, _ in slow]
        await asyncio.sleep(0.05)
        served = [(await files(request(wav_upload()))).status_code for _ in range(3)]  # beside the tricklers
        outcomes = await asyncio.gather(*held, return_exceptions=True)
        return served, outcomes

    served, outcomes = asyncio.run(scenario())
    assert served == [200, 200, 200]
    for out in outcomes:
        assert isinstance(out, HTTPException) and out.status_code == 408
        assert "bytes/s" in out.detail and "under" in out.detail


def test_bodies_arriving_at_once_are_bounded_and_a_body_that_arrives_in_time_is_served():
    async def scenario():
        files = endpoint(FakeModels(), max_receiving=1, body_grace_s=30)
        req, go = trickler(wav_upload())
        first = asyncio.create_task(files(req))
        await asyncio.sleep(0.05)
        with pytest.raises(HTTPException) as refused:
            await files(request(wav_upload()))
        go.set()
        return refused.value, (await first).status_code

    refused, first = asyncio.run(scenario())
    assert refused.status_code == 503 and "uploads arriving" in refused.detail
    assert first == 200


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
        openai_files.check_response_format("mp3")


def test_subtitles_and_words_in_openais_shapes():
    from dataclasses import replace

    from speech_serve.messages import Word

    results = [replace(_result(0, "hello", "en"), words=(Word("hello", 0, 480, 0.9),), confidence=0.9),
               replace(_result(1, "world", "en"), start_ms=3_723_004, end_ms=3_724_500,
                       words=(Word("world", 3_723_004, 3_724_000, 0.5),), confidence=0.5)]  # fmt: skip
    srt, media = openai_files.render("srt", results, 3725.0, "test")
    assert media.startswith("text/plain")
    assert srt == "1\n00:00:00,000 --> 00:00:00,500\nhello\n\n2\n01:02:03,004 --> 01:02:04,500\nworld\n\n"
    vtt = openai_files.render("vtt", results, 3725.0, "test")[0]
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.500\nhello\n") and "01:02:03.004 --> " in vtt
    verbose = json.loads(openai_files.render("verbose_json", results, 3725.0, "test", words=True)[0])
    assert verbose["words"] == [{"word": "hello", "start": 0.0, "end": 0.48, "confidence": 0.9},
                                {"word": "world", "start": 3723.004, "end": 3724.0, "confidence": 0.5}]  # fmt: skip
    assert verbose["segments"][1]["avg_logprob"] == pytest.approx(-0.6931, abs=1e-4)
    assert "words" not in json.loads(openai_files.render("verbose_json", results, 3725.0, "test")[0])


def test_word_granularity_and_a_prompts_hotwords_reach_the_recognition_and_bad_ones_get_400():
    models = FakeModels()
    seen = []
    original = models.recognise

    async def recording(request_id, utt, options, live=True):
        seen.append(options)
        return await original(request_id, utt, options, live)

    files = endpoint(models)
    recording.models_label = "test"
    files.recognise = recording
    fields = {"response_format": "verbose_json", "timestamp_granularities[]": "word",
              "prompt": "Xiaozhi, kitchen light"}  # fmt: skip
    response = asyncio.run(files(request(multipart(fields, [("file", "a.wav", wav_body())]))))
    assert response.status_code == 200
    assert seen[0].words and seen[0].hotwords == (("Xiaozhi", 1.5), ("kitchen light", 1.5))
    for bad in ({"timestamp_granularities[]": "word"}, {"timestamp_granularities[]": "char"},
                {"prompt": ",".join(f"w{i}" for i in range(101))}):  # fmt: skip
        with pytest.raises(HTTPException) as err:
            asyncio.run(files(request(multipart(bad, [("file", "a.wav", wav_body())]))))
        assert err.value.status_code == 400


class CuttingVad:
    """A VADHost's upload side: records each piece (lane, samples, start_ms, final) and answers one
    segment per piece; forgets the cut once at `lose_at` (as a new replica would); holds at `hold_at`."""

    def __init__(self, lose_at: int | None = None, hold_at: int | None = None):
        self.pieces: list[tuple[str, int, int, bool]] = []
        self.dropped: list[str] = []
        self.lose_at, self.hold_at = lose_at, hold_at
        self.holding = asyncio.Event()

        async def piece(lane, pcm, start_ms, final):
            self.pieces.append((lane, len(pcm), start_ms, final))
            if start_ms == self.hold_at:
                self.holding.set()
                await asyncio.Event().wait()  # a client that leaves meanwhile
            if start_ms == self.lose_at:
                self.lose_at = None
                return None
            return [(start_ms, start_ms + 500)]

        async def drop(lane):
            self.dropped.append(lane)
            return True

        self.segment_piece = SimpleNamespace(remote=piece)
        self.drop_file = SimpleNamespace(remote=drop)


def cut(vad: CuttingVad, samples: int, piece_ms: int, **retry):
    calls = ModelCalls(vad, None, None, AppSettings(retry=retry))

    async def run():
        found = await cut_into_segments(calls, np.zeros(samples, dtype=np.int16), "file-1", piece_ms)
        await asyncio.sleep(0.01)  # the drop goes out detached
        return found

    return asyncio.run(run())


def test_an_upload_is_cut_a_bounded_piece_per_call_on_its_own_lane_and_its_lane_is_released():
    """A whole file in one VADHost call held the replica's one model thread for seconds (an 1800 s
    file) while every live session's step waited behind it, past retry.try_timeout_s."""
    vad = CuttingVad()
    found = cut(vad, 16000 * 5 + 160, piece_ms=2000)  # 5.01 s
    assert vad.pieces == [("file-1", 32000, 0, False), ("file-1", 32000, 2000, False), ("file-1", 16160, 4000, True)]
    assert found == [(0, 500), (2000, 2500), (4000, 4500)]
    assert vad.dropped == ["file-1"]


def test_a_cut_whose_replica_lost_it_starts_over_and_a_client_that_leaves_stops_it():
    vad = CuttingVad(lose_at=2000)
    assert cut(vad, 16000 * 3, piece_ms=1000, backoff_s=0.01) == [(0, 500), (1000, 1500), (2000, 2500)]
    assert [start for _, _, start, _ in vad.pieces] == [0, 1000, 2000, 0, 1000, 2000] and vad.dropped == ["file-1"]

    vad = CuttingVad(hold_at=1000)
    calls = ModelCalls(vad, None, None, AppSettings())

    async def leave():
        task = asyncio.create_task(cut_into_segments(calls, np.zeros(16000 * 60, dtype=np.int16), "g", 1000))
        await vad.holding.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.01)

    asyncio.run(leave())
    assert len(vad.pieces) == 2 and vad.dropped == ["g"]  # no more pieces; the replica's cut is freed

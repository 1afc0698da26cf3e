"""OpenAI's own Python SDK, unchanged, against the service (a real local Ray Serve, conftest.py):
the file endpoint in its three response formats, and the Realtime transcription endpoint with the
SDK's realtime client streaming a two-utterance WAV at real time. Only `base_url` and our
credentials (the device token as the API key, the device id as a header) differ from talking to
OpenAI."""

import asyncio
import base64
import time

import openai
import pytest
import soxr
import websockets

from tests.support.audio import TWO_UTTERANCES_SPEECH_MS, TWO_UTTERANCES_WAV, read_pcm
from tests.support.service import TEST_DEVICE, device_token

pytestmark = pytest.mark.integration
DEVICE = {"Device-Id": TEST_DEVICE}
CHUNK_MS = 100  # one append per 100 ms of audio, sent at real time
HANG_GUARD_S = 120  # a wait for one event; far beyond any answer: only a hang gets there


def sdk(service: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{service}/v1", api_key=device_token(), default_headers=DEVICE)


@pytest.mark.parametrize("response_format", ["json", "text", "verbose_json"])
def test_the_file_api_answers_the_sdk_in_each_format(service, response_format):
    with open(TWO_UTTERANCES_WAV, "rb") as audio:
        answer = sdk(service).audio.transcriptions.create(
            model="sensevoice", file=audio, response_format=response_format
        )
    if response_format == "text":
        assert isinstance(answer, str) and answer.strip()
        return
    assert answer.text
    if response_format == "verbose_json":
        assert answer.duration == pytest.approx(8.17, abs=0.01)
        assert len(answer.segments) == 2 and " ".join(s.text for s in answer.segments) == answer.text
        for segment, (start, end) in zip(answer.segments, TWO_UTTERANCES_SPEECH_MS, strict=True):
            assert abs(segment.start * 1000 - start) < 400 and abs(segment.end * 1000 - end) < 400


def test_the_sdk_asks_for_word_timestamps_and_subtitles_and_reads_them(service):
    """`timestamp_granularities=["word"]` on verbose_json: OpenAI's `words` (in seconds), each inside
    its segment; a `prompt` is taken as hotwords; `srt` and `vtt` are OpenAI's subtitle texts."""
    with open(TWO_UTTERANCES_WAV, "rb") as audio:
        answer = sdk(service).audio.transcriptions.create(
            model="sensevoice", file=audio, response_format="verbose_json", timestamp_granularities=["word"],
            prompt="Xiaozhi, w100 w200",
        )  # fmt: skip
    assert answer.words and len(answer.segments) == 2 and HOTWORD in answer.text
    starts = [w.start for w in answer.words]
    assert starts == sorted(starts) and all(w.start < w.end for w in answer.words)
    assert answer.segments[0].start <= starts[0] and answer.words[-1].end <= answer.segments[-1].end + 0.06
    for response_format, first in (("srt", "1\n00:00:00,"), ("vtt", "WEBVTT\n\n00:00:00.")):
        with open(TWO_UTTERANCES_WAV, "rb") as audio:
            text = sdk(service).audio.transcriptions.create(model="sensevoice", file=audio,
                                                            response_format=response_format)  # fmt: skip
        assert isinstance(text, str) and text.startswith(first) and text.count(" --> ") == 2


HOTWORD = "w100 w200"  # two of the tiny model's words: its flat posteriors put any hotword within its bonus


def audio_24k() -> list[str]:
    """The WAV at 24 kHz (the Realtime API's PCM rate), as base64 appends of CHUNK_MS each."""
    pcm = soxr.resample(read_pcm(TWO_UTTERANCES_WAV), 16000, 24000).astype("<i2")
    step = 24 * CHUNK_MS
    return [base64.b64encode(pcm[i : i + step].tobytes()).decode() for i in range(0, len(pcm), step)]


async def stream_realtime(service: str) -> list:
    """Stream the WAV at real time through the SDK's realtime client, with one bad event in the
    middle; returns every event received after session.created, up to the second transcript."""
    client = openai.AsyncOpenAI(base_url=f"http://{service}/v1", api_key=device_token(), default_headers=DEVICE)
    events = []
    async with client.realtime.connect(model="sensevoice", extra_query={"intent": "transcription"}) as conn:
        created = await asyncio.wait_for(conn.recv(), HANG_GUARD_S)
        assert created.type == "session.created" and created.session.type == "transcription"
        await conn.session.update(
            session={
                "type": "transcription",
                "include": ["item.input_audio_transcription.logprobs"],
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "sensevoice", "language": "en", "prompt": HOTWORD},
                        "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                    }
                },
            }
        )

        async def send_audio() -> None:
            started = time.monotonic()
            for n, chunk in enumerate(audio_24k()):
                if n == 30:  # 3 s in, between the utterances' words: a bad event, then the audio goes on
                    await conn.send({"type": "response.create", "event_id": "bad-1"})
                await conn.input_audio_buffer.append(audio=chunk)
                await asyncio.sleep(max(0.0, started + (n + 1) * CHUNK_MS / 1000 - time.monotonic()))

        sender = asyncio.create_task(send_audio())
        try:
            while sum(e.type.endswith("transcription.completed") for e in events) < 2:
                events.append(await asyncio.wait_for(conn.recv(), HANG_GUARD_S))
            await sender
        finally:
            sender.cancel()
    return events


def test_the_realtime_client_gets_one_transcript_per_utterance_framed_by_speech_events(service):
    events = asyncio.run(stream_realtime(service))
    kinds = [e.type for e in events]
    assert kinds[0] == "session.updated"
    session = events[0].session
    assert session.audio.input.turn_detection.silence_duration_ms == 500
    assert session.audio.input.transcription.language == "en"
    assert session.include == ["item.input_audio_transcription.logprobs"]

    (error,) = [e for e in events if e.type == "error"]  # the bad event: answered, and the session went on
    assert error.error.type == "invalid_request_error" and error.error.event_id == "bad-1"
    assert error.error.param == "type"

    speech = [e for e in events if e.type.startswith("input_audio_buffer.") or e.type.endswith(".completed")]
    assert [e.type.rsplit(".", 1)[-1] for e in speech] == [
        "speech_started", "speech_stopped", "committed", "completed",
    ] * 2 or _interleaved(speech)  # fmt: skip
    completed = [e for e in speech if e.type.endswith(".completed")]
    deltas = [e for e in events if e.type.endswith("transcription.delta")]
    assert {e.item_id for e in deltas} <= {e.item_id for e in completed}
    assert len(completed) == 2 and all(e.transcript and e.content_index == 0 for e in completed)
    for e in completed:  # the prompt's phrase is a hotword; include asked for a log-probability per word
        assert HOTWORD in e.transcript and [lp.token for lp in e.logprobs] == e.transcript.split()
        assert all(lp.logprob <= 0 and bytes(lp.bytes).decode() == lp.token for lp in e.logprobs)
    assert all(e.logprobs is not None for e in deltas)
    for k, (start_ms, end_ms) in enumerate(TWO_UTTERANCES_SPEECH_MS):
        started, stopped, committed = (next(e for e in speech if e.type == f"input_audio_buffer.{kind}"
                                            and e.item_id == completed[k].item_id)
                                       for kind in ("speech_started", "speech_stopped", "committed"))  # fmt: skip
        assert abs(started.audio_start_ms - start_ms) < 400 and abs(stopped.audio_end_ms - end_ms) < 400
        assert committed.previous_item_id == (None if k == 0 else completed[k - 1].item_id)
        ours = completed[k].to_dict()["speech_serve"]  # our fields, beside OpenAI's
        assert ours["index"] == k and {"language", "emotion", "event", "speaker", "latency_ms"} <= set(ours)
    assert len({e.event_id for e in events}) == len(events)  # every server event has its own id


def _interleaved(speech: list) -> bool:
    """The second utterance's speech may start before the first one's transcript arrives: each
    item's own events are still in order (started, stopped, committed, completed)."""
    items: dict[str, list[str]] = {}
    for e in speech:
        items.setdefault(e.item_id, []).append(e.type.rsplit(".", 1)[-1])
    return list(items.values()) == [["speech_started", "speech_stopped", "committed", "completed"]] * 2


def test_a_realtime_client_with_a_bad_key_gets_an_error_event_and_close_1008(service):
    async def connect_with_a_bad_key():
        client = openai.AsyncOpenAI(base_url=f"http://{service}/v1", api_key="not-a-token", default_headers=DEVICE)
        async with client.realtime.connect(extra_query={"intent": "transcription"}) as conn:
            refused = await asyncio.wait_for(conn.recv(), HANG_GUARD_S)
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(conn.recv(), HANG_GUARD_S)
        return refused, closed.value.rcvd.code

    refused, close_code = asyncio.run(connect_with_a_bad_key())
    assert refused.type == "error" and refused.error.code == "unauthorized"  # before any session.created
    assert close_code == 1008


def test_the_sdks_beta_realtime_client_with_manual_turns(service):
    """Older SDKs speak the beta shape (`OpenAI-Beta: realtime=v1`, transcription_session.update,
    input_audio_format pcm16): served the same. Manual turns: the commit cuts the utterance."""
    first_utterance = audio_24k()[: TWO_UTTERANCES_SPEECH_MS[0][1] // CHUNK_MS + 3]

    async def one_turn():
        # the beta client always dials wss:// from base_url; websocket_base_url is its way to say ws://
        client = openai.AsyncOpenAI(base_url=f"http://{service}/v1", websocket_base_url=f"ws://{service}/v1",
                                    api_key=device_token(), default_headers=DEVICE)  # fmt: skip
        async with client.beta.realtime.connect(model="sensevoice", extra_query={"intent": "transcription"}) as conn:
            assert (await asyncio.wait_for(conn.recv(), HANG_GUARD_S)).type == "session.created"
            await conn.send({"type": "transcription_session.update", "session": {
                "input_audio_format": "pcm16", "input_audio_transcription": {"model": "sensevoice"},
                "turn_detection": None}})  # fmt: skip
            for chunk in first_utterance:  # as fast as it goes: nothing here depends on timing
                await conn.input_audio_buffer.append(audio=chunk)
            await conn.input_audio_buffer.commit()
            events = []
            while not events or events[-1].type != "conversation.item.input_audio_transcription.completed":
                events.append(await asyncio.wait_for(conn.recv(), HANG_GUARD_S))
        return events

    events = asyncio.run(one_turn())
    updated, committed, completed = events[0], events[-2], events[-1]
    assert updated.type == "transcription_session.updated" and updated.session.turn_detection is None
    assert [e.type for e in events if "speech_" in e.type] == []  # no VAD events with manual turns
    assert committed.type == "input_audio_buffer.committed" and committed.item_id == completed.item_id
    ours = completed.to_dict()["speech_serve"]
    assert completed.transcript and ours["start_ms"] == 0
    assert abs(ours["end_ms"] - len(first_utterance) * CHUNK_MS) < 100  # the whole turn, cut at the commit

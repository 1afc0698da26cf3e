"""`POST /v1/audio/transcriptions`, shaped like OpenAI's endpoint: pure request checks and
rendering, then the route's body (a device path: device authentication).

Form fields as OpenAI's: `file` (required), `model`, `language`, `response_format` (`json`, `text`,
`verbose_json`, `srt`, `vtt`), `timestamp_granularities[]` (`word` adds `words` to verbose_json),
`prompt` (comma-separated phrases: hotwords). One entry in `segments` per VAD segment, with our extra
fields beside OpenAI's (`avg_logprob` when words were decoded).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import Response

from speech_serve.ingress.audio import AudioTooLongError, decode_file
from speech_serve.ingress.auth import DeviceAuth, Identity, require_device
from speech_serve.ingress.protocols.parsing import ProtocolError, brief, hotword_list, prompt_phrases
from speech_serve.ingress.stream import ModelCalls, Recognition, RecognitionOptions, utterances_of
from speech_serve.ingress.stream.calls import REPLICA_GONE, RetryClock, awaited, bounded, detached
from speech_serve.ingress.uploads import UploadError, UploadGate, file_fields, read_upload_form, text_field
from speech_serve.messages import Utterance, UtteranceResult
from speech_serve.settings import AppSettings
from speech_serve.wire.pcm import SAMPLES_PER_MS, AudioFormatError

logger = logging.getLogger("ray.serve")

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
GRANULARITIES = ("segment", "word")


@dataclass
class FileRequest:
    data: bytes
    response_format: str = "json"
    language: str | None = None
    words: bool = False  # timestamp_granularities[] has "word"
    hotwords: tuple[tuple[str, float], ...] = ()  # from `prompt`


class TranscriptionRequestError(ValueError):
    """A bad request; the ingress answers it with HTTP 400 and this message."""


def check_response_format(response_format: str) -> str:
    if response_format not in RESPONSE_FORMATS:
        raise TranscriptionRequestError(
            f"response_format {brief(response_format)} is not supported; use one of {', '.join(RESPONSE_FORMATS)}"
        )
    return response_format


def _join(results: list[UtteranceResult]) -> str:
    return " ".join(r.text for r in results if r.text).strip()


def _main_language(results: list[UtteranceResult]) -> str | None:
    langs = Counter(r.language for r in results if r.language)
    return langs.most_common(1)[0][0] if langs else None


def _clock(ms: int, separator: str) -> str:
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


def subtitles(response_format: str, results: list[UtteranceResult]) -> str:
    """SRT or WebVTT: one cue per utterance."""
    said = [r for r in results if r.text]
    if response_format == "srt":
        return "".join(f"{k}\n{_clock(r.start_ms, ',')} --> {_clock(r.end_ms, ',')}\n{r.text}\n\n"
                       for k, r in enumerate(said, 1))  # fmt: skip
    return "WEBVTT\n\n" + "".join(f"{_clock(r.start_ms, '.')} --> {_clock(r.end_ms, '.')}\n{r.text}\n\n" for r in said)


def render(response_format: str, results: list[UtteranceResult], duration_s: float, models: str,
           words: bool = False) -> tuple[str, str]:  # fmt: skip
    """Return (body, media type)."""
    text = _join(results)
    if response_format == "text":
        return text + "\n", "text/plain; charset=utf-8"
    if response_format in ("srt", "vtt"):
        return subtitles(response_format, results), "text/plain; charset=utf-8"
    if response_format == "json":
        return json.dumps({"text": text, "models": models}, ensure_ascii=False), "application/json"
    body = {
        "task": "transcribe",
        "language": _main_language(results),
        "duration": round(duration_s, 3),
        "text": text,
        "models": models,
        "segments": [
            {
                "id": r.index,
                "start": r.start_ms / 1000,
                "end": r.end_ms / 1000,
                "text": r.text,
                **({"avg_logprob": round(math.log(max(r.confidence, 1e-12)), 4)} if r.confidence is not None else {}),
                "language": r.language,
                "emotion": r.emotion,
                "event": r.event,
                "speaker": {
                    "label": r.speaker.label,
                    "score": r.speaker.score,
                    **({"reason": r.speaker.reason} if r.speaker.reason else {}),
                },
                "latency_ms": r.latency_ms,
            }  # fmt: skip
            for r in results
        ],
    }
    if words:  # OpenAI's TranscriptionWord, and our confidence beside it
        body["words"] = [{"word": w.text, "start": w.start_ms / 1000, "end": w.end_ms / 1000,
                          "confidence": round(w.confidence, 3)} for r in results for w in r.words or ()]  # fmt: skip
    return json.dumps(body, ensure_ascii=False), "application/json"


Cut = Callable[[ModelCalls, np.ndarray, str, int], Awaitable[list[tuple[int, int]]]]  # `cut_into_segments`


class FileTranscriptions:
    """The route's body. Bounded per Ingress replica by its `UploadGate` (bodies arriving, then
    `max_concurrent` files at work: more get 503), each decoded off the event loop (a long file
    takes seconds of CPU that every live session of the replica would wait for) and recognised
    `max_upload_segments_in_flight` segments at a time."""

    def __init__(self, calls: ModelCalls, recognise: Recognition, device_auth: DeviceAuth, settings: AppSettings,
                 gate: UploadGate, cut: Cut | None = None, household=None):  # fmt: skip
        """`household`: the households' hotword lists (hotwords.py), which `recognise` applies."""
        self.calls, self.recognise, self.device_auth, self.household = calls, recognise, device_auth, household
        self.cut = cut or cut_into_segments
        self.uploads, self.min_utterance_ms = settings.uploads, settings.stream.min_utterance_ms
        self.limits = settings.limits  # the prompt's hotwords are bounded as a session's
        self.gate, self.default_group = gate, settings.voiceprints.default_group

    async def __call__(self, request: Request) -> Response:
        identity = require_device(self.device_auth, request)
        async with self.gate.admit(lambda: self._receive(request)) as asked:
            return await self._transcribe(asked, identity)

    async def _receive(self, request: Request) -> FileRequest:
        """The file's bytes and what the form asks, checked."""
        form = await read_upload_form(request, self.uploads, max_files=1)
        try:
            (upload,) = file_fields(form, "file")
            fmt = check_response_format(text_field(form, "response_format", "json"))
            granularities = [g for key in ("timestamp_granularities[]", "timestamp_granularities")
                             for g in form.getlist(key) if isinstance(g, str)]  # fmt: skip
            if any(g not in GRANULARITIES for g in granularities):
                raise TranscriptionRequestError(f"timestamp_granularities: each one of {', '.join(GRANULARITIES)}")
            if "word" in granularities and fmt != "verbose_json":
                raise TranscriptionRequestError("timestamp_granularities word needs response_format verbose_json")
            prompt = text_field(form, "prompt") or ""
            hotwords = hotword_list(prompt_phrases(prompt), self.limits)
            language = text_field(form, "language")
            return FileRequest(await upload.read(), fmt, language, "word" in granularities, hotwords)
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except (TranscriptionRequestError, ProtocolError) as exc:
            raise HTTPException(400, str(exc)) from None
        finally:
            await form.close()

    async def _transcribe(self, asked: FileRequest, identity: Identity) -> Response:
        data, asked.data = asked.data, b""  # held here only until it is decoded
        limits = self.uploads
        try:
            pcm, duration_s = await asyncio.to_thread(decode_file, data, limits.max_seconds, limits.max_sample_rate)
        except AudioTooLongError as exc:
            raise HTTPException(413, str(exc)) from None
        except AudioFormatError as exc:
            raise HTTPException(400, str(exc)) from None
        del data  # the decoded audio is all that is needed now
        request_id = "file-" + uuid.uuid4().hex[:12]
        group = identity.speaker_group(None) or self.default_group
        if self.household is not None:  # its household's hotwords load while the file is cut
            self.household.watch(group)
        segments = await self.cut(self.calls, pcm, request_id, round(limits.vad_piece_s * 1000))
        # the device's household when device auth is on, as on the WebSockets
        options = RecognitionOptions(language=asked.language or "auto", speaker_group=group,
                                     hotwords=asked.hotwords, words=asked.words or bool(asked.hotwords))  # fmt: skip
        in_flight = asyncio.Semaphore(limits.max_segments_in_flight)

        async def recognise(utterance: Utterance) -> UtteranceResult:
            async with in_flight:
                result, _ = await self.recognise(request_id, utterance, options, live=False)  # not in the backlog
                return result

        utterances = utterances_of(pcm, segments, self.min_utterance_ms)
        results = await asyncio.gather(*(recognise(u) for u in utterances))
        body, media_type = render(asked.response_format, list(results), duration_s, self.recognise.models_label,
                                  asked.words)  # fmt: skip
        return Response(content=body, media_type=media_type)


async def cut_into_segments(
    calls: ModelCalls, pcm: np.ndarray, request_id: str, piece_ms: int
) -> list[tuple[int, int]]:
    """Speech segments of a whole file, cut on one VADHost (the upload is a lane of its own) a piece
    of `piece_ms` per call: each holds the replica's one model thread a few ms, so the live
    sessions' VAD steps take turns with a long file (in one call, an 1800 s file held them for
    seconds, past `retry.try_timeout_s`). A client that leaves stops the cut at its next piece; a
    replica lost on the way: the cut starts over on the next one."""
    step, clock = piece_ms * SAMPLES_PER_MS, RetryClock(calls.retry)
    try:
        while len(pcm):
            segments: list[tuple[int, int]] = []
            for at in range(0, len(pcm), step):
                piece = partial(calls.vad.segment_piece.remote, request_id, pcm[at : at + step],
                                at // SAMPLES_PER_MS, at + step >= len(pcm))  # fmt: skip
                try:
                    done = await calls.try_once(clock, piece, "VADHost")
                except REPLICA_GONE as exc:
                    await calls.before_retry(clock, exc, "VADHost", request_id)
                    break
                if done is None:  # a new replica holds none of the cut
                    await calls.before_retry(clock, RuntimeError("the cut was lost"), "VADHost", request_id)
                    break
                segments += done
            else:
                return segments
        return []
    finally:  # frees the replica's cut if it stopped half-way, and the router's pin of the lane
        calls.keep_until_done(detached(_drop_cut(calls, request_id)))


async def _drop_cut(calls: ModelCalls, request_id: str) -> None:
    try:
        await bounded(awaited(calls.vad.drop_file.remote(request_id)), calls.retry.try_timeout_s)
    except Exception:  # the replica may be gone; its idle eviction forgets the cut then
        logger.info("upload %s: VAD drop failed; replica gone", request_id)

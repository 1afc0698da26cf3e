"""`POST /v1/audio/transcriptions`, shaped like OpenAI's endpoint: pure request checks and
rendering, then the route's body (a device path: device authentication).

Form fields as OpenAI's: `file` (required), `model`, `language`, `response_format`. One entry in
`segments` per VAD segment, with our extra fields beside OpenAI's.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter

from fastapi import HTTPException, Request
from fastapi.responses import Response

from speech_serve.ingress.audio import AudioTooLongError, decode_file
from speech_serve.ingress.auth import DeviceAuth, Identity, require_device
from speech_serve.ingress.protocols.parsing import brief
from speech_serve.ingress.stream import ModelCalls, Recognition, RecognitionOptions, utterances_of
from speech_serve.ingress.uploads import Slots, UploadError, file_fields, read_upload_form, text_field
from speech_serve.messages import Utterance, UtteranceResult
from speech_serve.settings import AppSettings
from speech_serve.wire.pcm import AudioFormatError

RESPONSE_FORMATS = ("json", "text", "verbose_json")


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


def render(response_format: str, results: list[UtteranceResult], duration_s: float, models: str) -> tuple[str, str]:
    """Return (body, media type)."""
    text = _join(results)
    if response_format == "text":
        return text + "\n", "text/plain; charset=utf-8"
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
    return json.dumps(body, ensure_ascii=False), "application/json"


class FileTranscriptions:
    """The route's body. Bounded per Ingress replica: `max_concurrent_uploads` at once (more get
    503 at once, before their body is read), each decoded off the event loop (a long file takes
    seconds of CPU that every live session of the replica would wait for) and recognised
    `max_upload_segments_in_flight` segments at a time."""

    def __init__(self, calls: ModelCalls, recognise: Recognition, device_auth: DeviceAuth, settings: AppSettings,
                 slots: Slots):  # fmt: skip
        self.calls, self.recognise, self.device_auth = calls, recognise, device_auth
        self.uploads, self.min_utterance_ms = settings.uploads, settings.stream.min_utterance_ms
        self.slots = slots  # shared with voiceprint enrolment: one cap on uploads per replica

    async def __call__(self, request: Request) -> Response:
        identity = require_device(self.device_auth, request)
        with self.slots.hold():
            return await self._transcribe(request, identity)

    async def _transcribe(self, request: Request, identity: Identity) -> Response:
        limits = self.uploads
        form = await read_upload_form(request, limits.max_bytes, max_files=1, timeout_s=limits.body_timeout_s)
        try:
            (upload,) = file_fields(form, "file")
            fmt = check_response_format(text_field(form, "response_format", "json"))
            language = text_field(form, "language")
            data = await upload.read()
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        except TranscriptionRequestError as exc:
            raise HTTPException(400, str(exc)) from None
        finally:
            await form.close()
        try:
            pcm, duration_s = await asyncio.to_thread(decode_file, data, limits.max_seconds, limits.max_sample_rate)
        except AudioTooLongError as exc:
            raise HTTPException(413, str(exc)) from None
        except AudioFormatError as exc:
            raise HTTPException(400, str(exc)) from None
        del data  # the decoded audio is all that is needed now
        request_id = "file-" + uuid.uuid4().hex[:12]
        segments = await self.calls.segment(pcm, request_id)
        # the device's household when device auth is on, as on the WebSockets
        options = RecognitionOptions(language=language or "auto", speaker_group=identity.speaker_group(None))
        in_flight = asyncio.Semaphore(limits.max_segments_in_flight)

        async def recognise(utterance: Utterance) -> UtteranceResult:
            async with in_flight:
                result, _ = await self.recognise(request_id, utterance, options, live=False)  # not in the backlog
                return result

        utterances = utterances_of(pcm, segments, self.min_utterance_ms)
        results = await asyncio.gather(*(recognise(u) for u in utterances))
        body, media_type = render(fmt, list(results), duration_s, self.recognise.models_label)
        return Response(content=body, media_type=media_type)

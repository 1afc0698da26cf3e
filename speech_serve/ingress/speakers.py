"""The admin API `/v1/speakers*`: voiceprint enrolment (create, list, get, rename, re-enrol,
delete). Pure request checks first, then the route bodies. The admin token is checked once, by
the `admin_only` dependency every route of this API declares (routes.py).

Every store call runs in a worker thread (`_db`): SQLite blocks, up to its 30 s lock wait, and
the event loop it would block is every live session's on this replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import asdict
from typing import TypeVar

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from starlette.datastructures import FormData

from speech_serve.ingress.audio import AudioTooLongError, decode_file
from speech_serve.ingress.auth import require_admin
from speech_serve.ingress.stream import ModelCalls
from speech_serve.ingress.uploads import UploadError, UploadGate, file_fields, read_upload_form, text_field
from speech_serve.settings import UploadSettings, VoiceprintSettings
from speech_serve.voiceprints import Voiceprint, VoiceprintStore
from speech_serve.wire.pcm import AudioFormatError

T = TypeVar("T")
NAME = Field(..., min_length=1, max_length=64, description="Shown as `speaker.label` in results.")


class EnrollmentError(ValueError):
    """A bad enrolment request: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RenameRequest(BaseModel):
    name: str = NAME


class EnrollFromSession(BaseModel):
    name: str = NAME
    session_id: str = Field(..., description="A live session on this ingress replica.")
    last_n: int = Field(3, ge=1, le=50, description="How many of its latest utterances to enrol.")
    group: str | None = Field(None, description="Defaults to the configured default group.")


def check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 64:
        raise EnrollmentError(400, "name must be 1 to 64 characters")
    return name


def decode_uploads(files: list[tuple[str, bytes]], settings: VoiceprintSettings) -> list[np.ndarray]:
    """Each upload as 16 kHz PCM, or a 4xx saying which file is wrong and why."""
    if not files:
        raise EnrollmentError(400, "send at least one audio file as `files`")
    if len(files) > settings.max_enroll_files:
        raise EnrollmentError(400, f"at most {settings.max_enroll_files} files per enrolment")
    clips = []
    for name, data in files:
        try:
            pcm, seconds = decode_file(data, settings.max_enroll_s)
        except AudioTooLongError:
            raise EnrollmentError(413, f"{name}: at most {settings.max_enroll_s:g} s of audio per file") from None
        except AudioFormatError as exc:
            raise EnrollmentError(400, f"{name}: {exc}") from None
        if seconds < settings.min_enroll_s:
            raise EnrollmentError(
                400, f"{name}: {seconds:.2f} s of audio; enrolment needs at least {settings.min_enroll_s:g} s"
            )
        clips.append(pcm)
    return clips


def voiceprint_json(vp: Voiceprint) -> dict:
    return asdict(vp)


def admin_only(request: Request) -> None:
    """FastAPI dependency of every admin route: the admin token, before the body is read."""
    require_admin(serve.get_replica_context().servable_object.admin_auth, request)


class SpeakerAdmin:
    """The bodies of the admin routes."""

    def __init__(
        self,
        store: VoiceprintStore,
        models: ModelCalls,
        settings: VoiceprintSettings,
        limits: UploadSettings,
        gate: UploadGate,
    ):
        self.store, self.models, self.settings, self.limits = store, models, settings, limits
        self.gate = gate  # the enrolments' own: devices' transcriptions never hold it

    def _enrolment_open(self) -> None:
        if not self.settings.enrolment:
            raise HTTPException(501, "enrolment is off on this service (voiceprints.enrolment: false): its voiceprint "
                                     "store is not shared by every host, so a voiceprint enrolled here would not "
                                     "reach the others")  # fmt: skip

    async def enroll(self, request: Request) -> dict:
        self._enrolment_open()
        async with self.gate.admit(lambda: self._enrolment_form(request)) as (form, files):
            try:
                name = check_name(text_field(form, "name", required=True))
            except (UploadError, EnrollmentError) as exc:
                raise HTTPException(exc.status, str(exc)) from None
            model, vectors = await self._embed_clips(await self._decode(files))
            group = text_field(form, "group") or self.settings.default_group
            return voiceprint_json(await _db(self.store.create, name, group, model, vectors))

    async def enroll_from_session(self, request: Request, live: dict) -> dict:
        self._enrolment_open()
        body = await _json_body(request, EnrollFromSession)
        conn = live.get(body.session_id)
        if conn is None or conn.stream is None:
            raise HTTPException(404, f"no live session {body.session_id!r} on this ingress replica")
        recent = list(conn.stream.embeddings)[-body.last_n :]
        if not recent:
            raise HTTPException(409, "the session has no finished utterance yet")
        group = body.group or conn.stream.options.speaker_group or self.settings.default_group
        model = recent[0][1].model
        return voiceprint_json(await _db(self.store.create, body.name, group, model, [e.vector for _, e in recent]))

    async def list(self, group: str | None) -> dict:
        return {"speakers": [voiceprint_json(v) for v in await _db(self.store.list, group)]}

    async def get(self, speaker_id: str) -> dict:
        return _found(await _db(self.store.get, speaker_id))

    async def rename(self, request: Request, speaker_id: str) -> dict:
        body = await _json_body(request, RenameRequest)
        return _found(await _db(self.store.rename, speaker_id, body.name.strip()))

    async def reenroll(self, request: Request, speaker_id: str) -> dict:
        self._enrolment_open()
        if await _db(self.store.get, speaker_id) is None:
            raise HTTPException(404, "no such speaker")
        async with self.gate.admit(lambda: self._enrolment_form(request)) as (_, files):
            model, vectors = await self._embed_clips(await self._decode(files))
            return _found(await _db(self.store.replace_embeddings, speaker_id, model, vectors))

    async def delete(self, speaker_id: str) -> Response:
        if not await _db(self.store.delete, speaker_id):
            raise HTTPException(404, "no such speaker")
        return Response(status_code=204)

    async def _embed_clips(self, clips) -> tuple[str, list]:
        results = await asyncio.gather(*(self.models.embed(c, None, "enrolment") for c in clips))
        embeddings = [e for e, _, _ in results]
        if any(e is None for e in embeddings):
            raise HTTPException(503, "the speaker model is disabled (speaker.enabled: false)")
        return embeddings[0].model, [e.vector for e in embeddings]

    async def _enrolment_form(self, request: Request) -> tuple[FormData, list[tuple[str, bytes]]]:
        """The form (text fields) and its `files` as (filename, bytes), read into memory."""
        form = await read_upload_form(request, self.limits, max_files=self.settings.max_enroll_files)
        try:
            return form, [(f.filename or "file", await f.read()) for f in file_fields(form, "files")]
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        finally:
            await form.close()

    async def _decode(self, files: list[tuple[str, bytes]]) -> list:
        """Off the event loop: up to max_enroll_files clips of CPU-bound decoding."""
        try:
            return await asyncio.to_thread(decode_uploads, files, self.settings)
        except EnrollmentError as exc:
            raise HTTPException(exc.status, str(exc)) from None


async def _db(call: Callable[..., T], *args) -> T:
    """A store call in a worker thread (the store keeps one SQLite connection per thread)."""
    return await asyncio.to_thread(call, *args)


async def _json_body(request: Request, model: type[BaseModel]):
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise HTTPException(422, exc.errors(include_url=False, include_context=False, include_input=False)) from None


def _found(vp):
    if vp is None:
        raise HTTPException(404, "no such speaker")
    return voiceprint_json(vp)

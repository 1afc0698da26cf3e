"""Voiceprint enrolment over HTTP: request bodies, upload checks and the JSON shape.

The routes are in `ingress.py`; everything here is pure so it can be tested without Serve.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
from pydantic import BaseModel, Field

from serve_app.audio import AudioFormatError, AudioTooLongError, decode_file
from serve_app.settings import VoiceprintSettings
from serve_app.voiceprints import Voiceprint

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

"""Credentials out of the logs: a logging filter that masks tokens in every record, and escapes the
control characters of its arguments (a device id, a path or a file name a client chose could
otherwise forge log lines or terminal escapes).

Masked: `token=` (and similar) query or form parameters, `Authorization` header values in any of the
shapes they get logged in (`Authorization: Bearer x`, a dict repr, an ASGI header tuple),
`Bearer <x>` (and `Bearer; <x>`) anywhere, device-token values (`<43 base64url chars>.<unix time>`), and the literal
values of the secrets this process holds (device secret, admin token).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from speech_serve.settings import MIN_REDACTED_CHARS

MASK = "[REDACTED]"
MIN_SECRET_LEN = MIN_REDACTED_CHARS  # shorter "secrets" would mask ordinary words; check_secret refuses them

_PARAM = re.compile(
    r"(?i)\b(token|access_token|authorization|api_key|apikey|password|secret)=(?!\[REDACTED\])([^&\s\"'<>#:,;)\]}]+)"
)
_HEADER = re.compile(  # atomic groups: no backtracking that would let "Bearer" itself pass as the value
    r"(?i)\b(authorization|proxy-authorization|x-api-key)(?>(\"?'?\s*[:,=]\s*(?:(?-i:b)?[\"'])?))"
    r"(?>(?:bearer;?\s+|basic\s+)?)(?![<\[])[^\s\"',;}\])]+"  # not `Bearer <token>` in a help text, nor a mask
)
_BEARER = re.compile(r"(?i)\bbearer;?\s+[A-Za-z0-9._~+/=-]+")  # `Bearer; x`: xiaozhi-esp32-server's spelling
# base64url(HMAC-SHA256).unix_time; not \b at the start: a token may begin with "-" (1 in 32)
_DEVICE_TOKEN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}\.\d{9,11}\b")


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                        text)  # fmt: skip


def _escaped(arg):
    """A log argument with its control characters escaped (the format string is ours; arguments may not be)."""
    if isinstance(arg, str):
        return escape_controls(arg)
    if isinstance(arg, BaseException):
        return escape_controls(str(arg))
    return arg


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    for secret in secrets:
        if len(secret) >= MIN_SECRET_LEN:
            text = text.replace(secret, MASK)
    text = _PARAM.sub(lambda m: f"{m.group(1)}={MASK}", text)
    text = _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
    text = _BEARER.sub(f"Bearer {MASK}", text)
    return _DEVICE_TOKEN.sub(MASK, text)


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and traceback text) with `redact` before any handler
    formats it. Never drops a record."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s and len(s) >= MIN_SECRET_LEN)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_escaped(arg) for arg in record.args)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it itself
            return True
        clean = redact(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        return True


def install_redaction(secrets: Iterable[str] = (), logger_names: Iterable[str] = ("ray.serve", "")) -> RedactingFilter:
    """Put one filter on each named logger (records logged there) and on each of their
    handlers (records that propagate into them from child loggers). Idempotent: a second
    call replaces the first's filter."""
    new = RedactingFilter(secrets)
    for name in logger_names:
        log = logging.getLogger(name)
        for target in (log, *log.handlers):
            for old in [f for f in target.filters if isinstance(f, RedactingFilter)]:
                target.removeFilter(old)
            target.addFilter(new)
    return new

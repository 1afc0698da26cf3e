"""Secrets stay out of settings and out of logs."""

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from speech_serve.ingress import redaction as redact
from speech_serve.wire.tokens import issue_token

DEVICE_TOKEN = issue_token("device-secret-value", "c1", "aa:bb:cc")
SECRETS = ("device-secret-value", "admin-token-value")


@pytest.mark.parametrize(
    "text, keep",
    [
        (f"refused /v1/stream?device_id=aa&token={DEVICE_TOKEN}&x=1", "device_id=aa"),
        ("refused /?token=abc&device_id=aa", "device_id=aa"),
        (f"headers: {{'authorization': 'Bearer {DEVICE_TOKEN}', 'device-id': 'aa'}}", "'device-id': 'aa'"),
        (f"scope headers [(b'authorization', b'Bearer {DEVICE_TOKEN}'), (b'host', b'h')]", "(b'host', b'h')"),
        ("Authorization: Bearer admin-token-value", "Authorization:"),
        ("Authorization: Basic dXNlcjpwYXNz", "Authorization:"),
        ("Authorization: Bearer; abc", "Authorization:"),  # xiaozhi-esp32-server's FunASR-server provider
        ("[(b'authorization', b'Bearer; abc')]", "b'authorization'"),
        ("sent bearer; abc here", "sent"),
        (f"a bare device token {DEVICE_TOKEN} in text", "a bare device token"),
        ("a token that starts with a dash -" + "x" * 42 + ".1795956227 too", "too"),
        ("the secret device-secret-value leaked", "the secret"),
        ("url /v1/stream?authorization=Bearer%20abc", "/v1/stream?"),
    ],
)
def test_redact_masks_credentials_and_keeps_the_rest(text, keep):
    clean = redact.redact(text, SECRETS)
    assert redact.MASK in clean and keep in clean
    for leaked in (DEVICE_TOKEN, *SECRETS, "abc", "dXNlcjpwYXNz", "x" * 42):
        assert leaked not in clean
    assert redact.redact(clean, SECRETS) == clean  # a second pass changes nothing


def test_redact_leaves_help_texts_and_plain_words_alone():
    for text in (
        "missing token: send Authorization: Bearer <token> or the token parameter",
        "missing Authorization: Bearer <admin token>",
        "device authentication is on but SPEECH_SERVE_DEVICE_SECRET is not set",
        "session 3f2a: 2 utterances",
    ):
        assert redact.redact(text, SECRETS) == text


@contextmanager
def logged(name: str) -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger of its own whose records land in a string, with the redaction filter installed."""
    log = logging.getLogger(name)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log.addHandler(handler)
    log.propagate = False
    try:
        redact.install_redaction(SECRETS, logger_names=[log.name])
        yield log, stream
    finally:
        log.removeHandler(handler)


def test_filter_cleans_arguments_and_tracebacks_before_any_handler_formats_them():
    with logged("test.redact.filter") as (log, stream):
        redact.install_redaction(SECRETS, logger_names=[log.name])  # idempotent: one filter, not two
        assert sum(isinstance(f, redact.RedactingFilter) for f in log.filters) == 1
        log.warning("refused %s: %s", f"/v1/stream?token={DEVICE_TOKEN}", "invalid token")
        try:
            raise ValueError(f"bad header Authorization: Bearer {DEVICE_TOKEN}")
        except ValueError:
            log.exception("session %s failed", "s1")
        child = logging.getLogger(f"{log.name}.child")  # propagates into the handler, not the logger filter
        child.warning("child saw admin-token-value")
    out = stream.getvalue()
    assert "refused /v1/stream?token=[REDACTED]: invalid token" in out
    assert "session s1 failed" in out and "ValueError: bad header Authorization: [REDACTED]" in out
    assert "child saw [REDACTED]" in out
    assert DEVICE_TOKEN not in out and "admin-token-value" not in out


def test_filter_never_drops_a_record_it_cannot_format():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d apples", ("not a number",), None)
    assert redact.RedactingFilter(SECRETS).filter(record) is True


def test_control_characters_a_client_chose_are_escaped_in_the_logs():
    """A device id or path with a newline forged a second log line; an ESC sequence recoloured a
    terminal. Arguments are escaped; our own format strings (a banner's newlines) are not."""
    with logged("test.redact.controls") as (log, stream):
        log.warning("refused %s: %s", "/v1/stream?device_id=a\nINFO admitted everyone", ValueError("x\x1b[31my"))
        log.warning("\n%s\n", "banner")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "refused /v1/stream?device_id=a\\x0aINFO admitted everyone: x\\x1b[31my"
    assert lines[1:4] == ["", "banner", ""]

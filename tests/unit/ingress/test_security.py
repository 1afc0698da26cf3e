"""Secrets stay out of settings and out of logs."""

import io
import logging
import re

import pytest
from pydantic import BaseModel, ValidationError

from speech_serve.ingress import security as redact
from speech_serve.settings import ENV_NAME, AppSettings
from speech_serve.wire.tokens import issue_token

SECRETISH = re.compile(r"secret|token|password|passwd|api_?key|credential|private_key|auth_key", re.I)


def _fields(model: type[BaseModel], prefix: str = ""):
    for name, info in model.model_fields.items():
        yield f"{prefix}{name}", info
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            yield from _fields(kind, f"{prefix}{name}.")


def test_no_setting_can_hold_a_secret_only_the_name_of_its_environment_variable():
    fields = dict(_fields(AppSettings))
    secretish = {path: info for path, info in fields.items() if SECRETISH.search(path.rsplit(".", 1)[-1])}
    assert set(secretish) >= {"security.device_secret_env", "security.admin_token_env"}  # the check sees them
    for path, info in secretish.items():
        if info.annotation in (int, float, bool):  # max_token_age_s: about a secret, cannot hold one
            continue
        assert path.endswith("_env") and info.annotation is str, f"{path} looks like it holds a secret value"
        assert ENV_NAME.match(info.default), path


@pytest.mark.parametrize("field", ["device_secret_env", "admin_token_env"])
def test_a_secret_pasted_into_an_env_setting_is_refused_and_not_echoed(field):
    pasted = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b"
    with pytest.raises(ValidationError) as err:
        AppSettings(security={field: pasted})
    assert f"security.{field}" in str(err.value) and "environment variable" in str(err.value)
    assert pasted not in str(err.value)


def test_the_old_xiaozhi_auth_keys_say_where_they_moved():
    with pytest.raises(ValidationError, match=r"xiaozhi.auth_enabled -> security.device_auth"):
        AppSettings(xiaozhi={"auth_enabled": True, "hello_timeout_s": 5})


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


def test_filter_cleans_arguments_and_tracebacks_before_any_handler_formats_them():
    log = logging.getLogger("test.redact.filter")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    log.addHandler(handler)
    log.propagate = False
    try:
        redact.install_redaction(SECRETS, logger_names=[log.name])
        redact.install_redaction(SECRETS, logger_names=[log.name])  # idempotent: one filter, not two
        assert sum(isinstance(f, redact.RedactingFilter) for f in log.filters) == 1
        log.warning("refused %s: %s", f"/v1/stream?token={DEVICE_TOKEN}", "invalid token")
        try:
            raise ValueError(f"bad header Authorization: Bearer {DEVICE_TOKEN}")
        except ValueError:
            log.exception("session %s failed", "s1")
        child = logging.getLogger(f"{log.name}.child")  # propagates into the handler, not the logger filter
        child.warning("child saw admin-token-value")
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    assert "refused /v1/stream?token=[REDACTED]: invalid token" in out
    assert "session s1 failed" in out and "ValueError: bad header Authorization: [REDACTED]" in out
    assert "child saw [REDACTED]" in out
    assert DEVICE_TOKEN not in out and "admin-token-value" not in out


def test_filter_never_drops_a_record_it_cannot_format():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d apples", ("not a number",), None)
    assert redact.RedactingFilter(SECRETS).filter(record) is True

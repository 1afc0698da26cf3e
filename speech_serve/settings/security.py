"""Who may connect: device authentication, the admin token, the secrets' environment variables."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from speech_serve.settings.base import Section
from speech_serve.wire.tokens import DEFAULT_ADMIN_TOKEN_ENV, DEFAULT_SECRET_ENV, MIN_SECRET_CHARS

MIN_REDACTED_CHARS = 8  # the log filter masks secrets at least this long; shorter ones would mask plain words
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class SecuritySettings(Section):
    """Who may connect. Secrets are never settings: only the *names* of the environment
    variables that hold them (`*_env`), so config files can be shared and committed."""

    device_auth: Literal["auto", "on", "off"] = "auto"
    """Device authentication on every device path (Xiaozhi, plain, FunASR, Realtime, file uploads). auto: on
    unless Serve's HTTP host is a loopback address (or cannot be learned)."""
    device_secret_env: str = DEFAULT_SECRET_ENV
    """Environment variable holding the HMAC secret of device tokens."""
    max_token_age_s: int = 30 * 24 * 3600
    """Device tokens older than this are refused."""
    allowed_devices: list[str] = Field(default_factory=list)
    """Device ids admitted without a token."""
    device_groups: dict[str, str] = Field(default_factory=dict)
    """Speaker group (household) of each device id; a device not listed is its own group, `device:<id>`. With
    device authentication on, clients cannot choose another (speaker_group must match or be left out)."""
    min_secret_chars: int = Field(MIN_SECRET_CHARS, ge=MIN_REDACTED_CHARS)
    """Shortest device secret or admin token accepted: a shorter one set in the environment stops the ingress
    from starting (and could not be masked in the logs)."""
    admin_token_env: str = DEFAULT_ADMIN_TOKEN_ENV
    """Environment variable holding the bearer token of /v1/speakers*."""
    bind_host_timeout_s: float = 10.0
    """How long the ingress waits for Serve's controller to say which host it binds."""

    @field_validator("device_secret_env", "admin_token_env")
    @classmethod
    def _names_a_variable(cls, value: str) -> str:
        if not ENV_NAME.match(value):
            raise ValueError(
                "must be the NAME of an environment variable (like SPEECH_SERVE_DEVICE_SECRET): "
                "secrets never go into settings, only the variable that holds them"
            )
        return value

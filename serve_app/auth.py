"""Device tokens of the Xiaozhi reference server: `<sig>.<ts>`, where
sig = base64url-without-padding(HMAC-SHA256(secret, "client_id|device_id|ts")).

The token names neither device nor client: both come with the connection and are signed
again here, so a token works only for the device and client it was issued to.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class AuthDecision:
    ok: bool
    reason: str = ""


def _sign(secret: str, client_id: str, device_id: str, ts: int) -> str:
    digest = hmac.new(secret.encode(), f"{client_id}|{device_id}|{ts}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def issue_token(secret: str, client_id: str, device_id: str, now: float | None = None) -> str:
    ts = int(time.time() if now is None else now)
    return f"{_sign(secret, client_id, device_id, ts)}.{ts}"


def check_device(
    authorization: str | None,
    client_id: str | None,
    device_id: str | None,
    secret: str,
    max_age_s: int,
    allowed_devices: frozenset[str] = frozenset(),
    now: float | None = None,
) -> AuthDecision:
    """Allow-listed device ids pass without a token; everyone else needs a fresh, valid one."""
    if not device_id:
        return AuthDecision(False, "missing Device-Id")
    if device_id in allowed_devices:
        return AuthDecision(True, "allow-listed")
    if not authorization:
        return AuthDecision(False, "missing Authorization token")
    token = authorization.removeprefix("Bearer ").removeprefix("bearer ").strip()
    sig, _, ts_text = token.partition(".")
    if not sig or not ts_text.isdigit():
        return AuthDecision(False, "malformed token")
    ts = int(ts_text)
    age = int(time.time() if now is None else now) - ts
    if age > max_age_s:
        return AuthDecision(False, "token expired")
    if age < -60:
        return AuthDecision(False, "token from the future")
    if not hmac.compare_digest(sig, _sign(secret, client_id or "", device_id, ts)):
        return AuthDecision(False, "invalid token")
    return AuthDecision(True, "token")


class AuthConfigError(RuntimeError):
    """Authentication is on but cannot work; the message says what to set."""


class DeviceAuth:
    """The ingress's gate for device connections, built from `XiaozhiSettings`."""

    def __init__(
        self, enabled: bool, secret: str = "", max_age_s: int = 0, allowed_devices: frozenset[str] = frozenset()
    ):
        self.enabled, self.secret, self.max_age_s, self.allowed_devices = enabled, secret, max_age_s, allowed_devices

    @classmethod
    def from_settings(cls, settings, environ: Mapping[str, str] = os.environ) -> DeviceAuth:
        if not settings.auth_enabled:
            return cls(enabled=False)
        secret = environ.get(settings.secret_env, "")
        if not secret:
            raise AuthConfigError(
                f"xiaozhi.auth_enabled is true but the environment variable {settings.secret_env} is empty. "
                f"Set it to the shared secret (e.g. `export {settings.secret_env}=$(openssl rand -hex 32)`), "
                f"or set xiaozhi.auth_enabled: false in config/serve.yaml."
            )
        return cls(True, secret, settings.max_token_age_s, frozenset(settings.allowed_devices))

    def check(self, params) -> AuthDecision:
        """`params`: anything with authorization, client_id and device_id (xiaozhi.ConnectParams)."""
        if not self.enabled:
            return AuthDecision(True, "authentication disabled")
        return check_device(
            params.authorization, params.client_id, params.device_id, self.secret, self.max_age_s, self.allowed_devices
        )

"""Who may connect: device tokens for every device path, a bearer token for the admin API.

Device tokens are the Xiaozhi reference server's: `<sig>.<ts>`, where
sig = base64url-without-padding(HMAC-SHA256(secret, "client_id|device_id|ts")).
The token names neither device nor client: both come with the connection and are signed
again here, so a token works only for the device (and client, if one was named) it was
issued to. Xiaozhi devices send them in headers; plain and FunASR clients, and file uploads,
may use `Authorization: Bearer <token>` or the `token` query parameter (FunASR clients cannot
always set headers), with `Device-Id` / `device_id` and optionally `Client-Id` / `client_id`.

Mint a token (the secret is read from the environment, never from an argument):

    SPEECH_SERVE_DEVICE_SECRET=... python -m serve_app.auth --device-id aa:bb:cc:dd:ee:ff
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from serve_app.settings import SecuritySettings

logger = logging.getLogger("ray.serve")

# HTTP statuses of a refusal (a WebSocket is closed with 1008 whatever the status).
MISSING, FORBIDDEN, NOT_CONFIGURED = 401, 403, 503
CLOCK_SKEW_S = 60  # tokens minted this far in the future still pass (device clocks drift)


@dataclass(frozen=True)
class AuthDecision:
    ok: bool
    reason: str = ""
    status: int = 200


@dataclass(frozen=True)
class Credentials:
    """What a connection says about itself; anything with these three fields will do
    (Xiaozhi's `ConnectParams` too)."""

    device_id: str | None
    client_id: str | None
    authorization: str | None


def device_credentials(headers: Mapping[str, str], query: Mapping[str, str]) -> Credentials:
    """Headers win; clients that cannot set headers use query parameters."""

    def get(header: str, *params: str) -> str | None:
        return headers.get(header) or next((query[p] for p in params if query.get(p)), None)

    return Credentials(
        device_id=get("device-id", "device_id", "device-id"),
        client_id=get("client-id", "client_id", "client-id"),
        authorization=get("authorization", "token", "authorization"),
    )


def _sign(secret: str, client_id: str, device_id: str, ts: int) -> str:
    digest = hmac.new(secret.encode(), f"{client_id}|{device_id}|{ts}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def issue_token(secret: str, client_id: str, device_id: str, now: float | None = None) -> str:
    """A device token. `client_id` may be "" for clients that send none (plain, FunASR)."""
    ts = int(time.time() if now is None else now)
    return f"{_sign(secret, client_id, device_id, ts)}.{ts}"


def device_headers(device_id: str | None, token: str | None) -> dict[str, str]:
    """Client side: the headers that carry a device's credentials."""
    headers = {"Device-Id": device_id} if device_id else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def url_with_token(url: str, device_id: str | None, token: str | None) -> str:
    """Client side: the credentials as query parameters, for clients that cannot set headers."""
    params = {k: v for k, v in (("device_id", device_id), ("token", token)) if v}
    return f"{url}{'&' if '?' in url else '?'}{urlencode(params)}" if params else url


def _bearer(authorization: str) -> str:
    scheme, _, rest = authorization.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" and rest else authorization.strip()


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
        return AuthDecision(False, "missing device id: send the Device-Id header or the device_id parameter", MISSING)
    if device_id in allowed_devices:
        return AuthDecision(True, "allow-listed")
    if not authorization:
        return AuthDecision(False, "missing token: send Authorization: Bearer <token> or the token parameter", MISSING)
    sig, _, ts_text = _bearer(authorization).partition(".")
    if not sig or not ts_text.isdigit():
        return AuthDecision(False, "malformed token", FORBIDDEN)
    ts = int(ts_text)
    age = int(time.time() if now is None else now) - ts
    if age > max_age_s:
        return AuthDecision(False, "token expired", FORBIDDEN)
    if age < -CLOCK_SKEW_S:
        return AuthDecision(False, "token from the future", FORBIDDEN)
    if not hmac.compare_digest(sig, _sign(secret, client_id or "", device_id, ts)):
        return AuthDecision(False, "invalid token", FORBIDDEN)
    return AuthDecision(True, "token")


# ---- when device authentication is on -----------------------------------------------------


def is_loopback(host: str | None) -> bool:
    """True only for hosts nobody else can reach: 127.0.0.0/8, ::1, localhost."""
    if not host:
        return False
    if host.strip("[]").lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def device_auth_required(mode: str, bind_host: str | None) -> tuple[bool, str]:
    """(on?, why). `bind_host` None means it could not be learned: then auto fails safe (on)."""
    binds = f"Serve binds {bind_host}" if bind_host else "Serve's HTTP host could not be learned"
    if mode in ("on", "off"):
        return mode == "on", f"security.device_auth: {mode} ({binds})"
    if bind_host is None:
        return True, f"security.device_auth: auto, and {binds}: failing safe"
    if is_loopback(bind_host):
        return False, f"security.device_auth: auto, and {binds}, a loopback address"
    return True, f"security.device_auth: auto, and {binds}, reachable from other machines"


def serve_bind_host(timeout_s: float) -> str | None:
    """The host Serve's HTTP proxies listen on, from the controller (the same config the
    proxies were started with, whether by `serve run`, `serve deploy` or `serve.start`).
    None when it cannot be learned."""
    try:
        import ray
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        if not ray.is_initialized():  # get_actor would start a Ray of its own
            return None
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        if ray.get(controller.get_proxy_location.remote(), timeout=timeout_s) is None:
            return None  # no proxy manager: get_http_config() would answer defaults, not the truth
        return ray.get(controller.get_http_config.remote(), timeout=timeout_s).host
    except Exception as exc:  # no controller, timeout, a Ray without these methods
        logger.warning("cannot learn Serve's HTTP host (%s: %s)", type(exc).__name__, exc)
        return None


class DeviceAuth:
    """The ingress's gate for every device connection and upload."""

    def __init__(
        self,
        enabled: bool,
        secret: str = "",
        max_age_s: int = 0,
        allowed_devices: frozenset[str] = frozenset(),
        secret_env: str = "",
        why: str = "",
    ):
        self.enabled, self.secret, self.max_age_s = enabled, secret, max_age_s
        self.allowed_devices, self.secret_env, self.why = allowed_devices, secret_env, why

    @classmethod
    def from_settings(
        cls, security: SecuritySettings, bind_host: str | None, environ: Mapping[str, str] = os.environ
    ) -> DeviceAuth:
        """Never fails: a missing secret refuses devices instead (see `problem`)."""
        enabled, why = device_auth_required(security.device_auth, bind_host)
        return cls(
            enabled,
            environ.get(security.device_secret_env, "") if enabled else "",
            security.max_token_age_s,
            frozenset(security.allowed_devices),
            security.device_secret_env,
            why,
        )

    @property
    def problem(self) -> str | None:
        """What stops devices from connecting at all, in words for the operator."""
        if self.enabled and not self.secret:
            return (
                f"device authentication is on ({self.why}) but the environment variable {self.secret_env} is not "
                f"set: every device except allowed_devices is refused. Set it before starting "
                f"(`export {self.secret_env}=$(openssl rand -hex 32)`), or bind 127.0.0.1, "
                f"or set security.device_auth: off."
            )
        return None

    def check(self, credentials) -> AuthDecision:
        """`credentials`: anything with authorization, client_id and device_id."""
        if not self.enabled:
            return AuthDecision(True, "authentication disabled")
        if not self.secret and credentials.device_id not in self.allowed_devices:
            return AuthDecision(
                False, f"device authentication is on but {self.secret_env} is not set on the server", NOT_CONFIGURED
            )
        return check_device(
            credentials.authorization,
            credentials.client_id,
            credentials.device_id,
            self.secret,
            self.max_age_s,
            self.allowed_devices,
        )


class AdminAuth:
    """The bearer token of the admin API (`/v1/speakers*`), from the environment."""

    def __init__(self, token: str, env_name: str):
        self.token, self.env_name = token, env_name

    @classmethod
    def from_settings(cls, security: SecuritySettings, environ: Mapping[str, str] = os.environ) -> AdminAuth:
        return cls(environ.get(security.admin_token_env, ""), security.admin_token_env)

    def check(self, authorization: str | None) -> AuthDecision:
        if not self.token:
            return AuthDecision(
                False, f"the admin API is disabled: set the environment variable {self.env_name} on the server",
                NOT_CONFIGURED,
            )  # fmt: skip
        if not authorization:
            return AuthDecision(False, "missing Authorization: Bearer <admin token>", MISSING)
        # Equal-length digests: the comparison leaks neither content nor length.
        given = hashlib.sha256(_bearer(authorization).encode()).digest()
        if not hmac.compare_digest(given, hashlib.sha256(self.token.encode()).digest()):
            return AuthDecision(False, "wrong admin token", FORBIDDEN)
        return AuthDecision(True, "admin token")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Mint a device token (the secret comes from the environment).")
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--client-id", default="", help="Xiaozhi devices send one; plain and FunASR clients need not")
    parser.add_argument("--secret-env", default=SecuritySettings().device_secret_env)
    args = parser.parse_args(argv)
    secret = os.environ.get(args.secret_env)
    if not secret:
        raise SystemExit(f"set {args.secret_env} to the server's device secret first")
    print(issue_token(secret, args.client_id, args.device_id))


if __name__ == "__main__":
    main()

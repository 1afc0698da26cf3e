"""Who a connection is: device tokens on every device path, and the admin token.

Device tokens (minted by speech_serve/wire/tokens.py) are the Xiaozhi reference server's. Xiaozhi
devices send them in headers; plain, FunASR and Realtime clients (OpenAI's SDK sends its api_key as
a bearer token), and file uploads, may use `Authorization: Bearer <token>` or the `token` query
parameter (FunASR clients and browsers cannot always set headers), with `Device-Id` / `device_id`
and optionally `Client-Id` / `client_id`. The admin API (`/v1/speakers*`) takes a bearer token from
the environment.

Identity is decided once per connection: `device_credentials` is the one parser of credentials
(every protocol, the file endpoint), `DeviceAuth.check` authenticates them and returns the
`Identity` the session is then admitted, counted and matched under (its speaker group too).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from fastapi import HTTPException
from starlette.requests import Request

from speech_serve.settings import SecuritySettings
from speech_serve.wire.tokens import SEPARATOR, sign

logger = logging.getLogger("ray.serve")

# HTTP statuses of a refusal (a WebSocket is closed with 1008 whatever the status).
BAD_REQUEST, MISSING, FORBIDDEN, NOT_CONFIGURED = 400, 401, 403, 503
CLOCK_SKEW_S = 60  # tokens minted this far in the future still pass (device clocks drift)
# `<base64url(HMAC-SHA256), 43 chars>.<unix time>`, ASCII only: str.isdigit() and int() take
# '²' and fullwidth digits, and hmac.compare_digest raises on non-ASCII str.
_TOKEN = re.compile(r"([A-Za-z0-9_-]{43})\.([0-9]{1,12})")


class GroupNotAllowed(ValueError):
    """A client named a speaker group other than the one its authenticated device is given."""


@dataclass(frozen=True)
class Identity:
    """Who a connection is, decided once by `DeviceAuth.check`: the session is admitted, counted
    per device and matched against voiceprints under this, whatever the client says later."""

    device_id: str | None = None
    client_id: str | None = None
    group: str | None = None  # the server's speaker group for this device (mapped, else its id)
    group_fixed: bool = False  # device auth on: the client may not choose another group

    def speaker_group(self, requested: str | None) -> str | None:
        """Whose voiceprints the connection is matched against. None: the configured default.
        Raises GroupNotAllowed when an authenticated device names a group not its own."""
        if not self.group_fixed:
            return requested  # no device auth: a trusted (loopback) client chooses
        if requested is not None and requested != self.group:
            raise GroupNotAllowed(
                "speaker_group is set by the server for authenticated devices (the device's household); "
                "leave it out or send your own"
            )
        return self.group


OWN_GROUP_PREFIX = "device:"


def own_group(device_id: str) -> str:
    """The speaker group of a device that security.device_groups does not map: `device:<id>`, never a
    household's name (a device called `kitchen` or `default` was matched against that household)."""
    return OWN_GROUP_PREFIX + device_id


@dataclass(frozen=True)
class AuthDecision:
    ok: bool
    reason: str = ""
    status: int = 200
    identity: Identity | None = None  # set when ok


@dataclass(frozen=True)
class Credentials:
    """What a connection says about itself."""

    device_id: str | None
    client_id: str | None
    authorization: str | None


class CredentialError(ValueError):
    """The credentials cannot be read one way only; the connection is refused (400 / 1008)."""

    status = BAD_REQUEST


# field -> (header, query parameters): every spelling any client uses
_CREDENTIAL_FIELDS = {
    "device_id": ("device-id", ("device_id", "device-id")),
    "client_id": ("client-id", ("client_id", "client-id")),
    "authorization": ("authorization", ("token", "authorization")),
}


def _values(source: Mapping[str, str], key: str) -> list[str]:
    """Every value of `key` (Starlette's headers and query parameters may repeat one)."""
    getlist = getattr(source, "getlist", None)
    if getlist is not None:
        return list(getlist(key))
    value = source.get(key)
    return [] if value is None else [value]


# How OpenAI's browser Realtime clients send their key: a WebSocket subprotocol (browsers cannot set headers).
KEY_SUBPROTOCOL = "openai-insecure-api-key."


def device_credentials(
    headers: Mapping[str, str], query: Mapping[str, str], subprotocols: Iterable[str] = ()
) -> Credentials:
    """The one parser of device credentials, for every protocol and the file endpoint: headers for
    clients that can set them, query parameters for those that cannot, in every spelling, and the
    token as a `KEY_SUBPROTOCOL` WebSocket subprotocol (Realtime browser clients).

    A field given more than once must say the same thing each time (`?device-id=A&device_id=B`
    is refused): otherwise which value counts would depend on who reads it. Raises
    CredentialError."""

    def one(field: str) -> str | None:
        header, params = _CREDENTIAL_FIELDS[field]
        given = [*_values(headers, header), *(v for p in params for v in _values(query, p))]
        if field == "authorization":
            given += [p[len(KEY_SUBPROTOCOL) :] for p in subprotocols if p.startswith(KEY_SUBPROTOCOL)]
        distinct: dict[str, str] = {}  # compared as the server reads it ("Bearer t" is "t"); the first kept
        for value in filter(None, given):
            distinct.setdefault(_bearer(value) if field == "authorization" else value, value)
        if len(distinct) > 1:
            raise CredentialError(f"{field} given with two different values (headers and query parameters, "
                                  f"or one repeated): send it once")  # fmt: skip
        return next(iter(distinct.values()), None)

    return Credentials(device_id=one("device_id"), client_id=one("client_id"), authorization=one("authorization"))


def _bearer(authorization: str) -> str:
    """The token of `Bearer <token>`. `Bearer; <token>` too: xiaozhi-esp32-server's FunASR-server ASR
    provider sends its api_key so (core/providers/asr/fun_server.py), and it is a fleet's way in."""
    scheme, _, rest = authorization.strip().partition(" ")
    return rest.strip() if scheme.lower() in ("bearer", "bearer;") and rest else authorization.strip()


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
    if SEPARATOR in device_id or SEPARATOR in (client_id or ""):  # the signed string would be ambiguous
        return AuthDecision(False, f"device and client ids may not contain {SEPARATOR!r}", BAD_REQUEST)
    if not authorization:
        return AuthDecision(False, "missing token: send Authorization: Bearer <token> or the token parameter", MISSING)
    token = _TOKEN.fullmatch(_bearer(authorization))
    if token is None:
        return AuthDecision(False, "malformed token", FORBIDDEN)
    sig, ts = token.group(1), int(token.group(2))
    age = int(time.time() if now is None else now) - ts
    if age > max_age_s:
        return AuthDecision(False, "token expired", FORBIDDEN)
    if age < -CLOCK_SKEW_S:
        return AuthDecision(False, "token from the future", FORBIDDEN)
    if not hmac.compare_digest(sig, sign(secret, client_id or "", device_id, ts)):
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


class InsecureSecret(ValueError):
    """A secret in the environment is too short to be one: the ingress refuses to start."""


def check_secret(value: str, env_name: str, min_chars: int) -> str:
    """`value`, or InsecureSecret (naming the variable, never the value) if set but shorter than
    `min_chars`: a short secret can be guessed, and one shorter than the redaction floor would not
    even be masked in the logs."""
    if value and len(value) < min_chars:
        raise InsecureSecret(
            f"the secret in the environment variable {env_name} must be at least {min_chars} characters "
            f"(security.min_secret_chars); make one with `openssl rand -hex 32`"
        )
    return value


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
        device_groups: Mapping[str, str] | None = None,
    ):
        self.enabled, self.secret, self.max_age_s = enabled, secret, max_age_s
        self.allowed_devices, self.secret_env, self.why = allowed_devices, secret_env, why
        self.device_groups = dict(device_groups or {})

    @classmethod
    def from_settings(
        cls, security: SecuritySettings, bind_host: str | None, environ: Mapping[str, str] = os.environ
    ) -> DeviceAuth:
        """A missing secret does not stop the start: devices are refused instead (see `problem`).
        A secret that is set but too short does: InsecureSecret."""
        enabled, why = device_auth_required(security.device_auth, bind_host)
        secret = environ.get(security.device_secret_env, "") if enabled else ""
        return cls(
            enabled,
            check_secret(secret, security.device_secret_env, security.min_secret_chars),
            security.max_token_age_s,
            frozenset(security.allowed_devices),
            security.device_secret_env,
            why,
            security.device_groups,
        )

    def identity(self, credentials: Credentials) -> Identity:
        """Who the (accepted) credentials say the connection is, and its speaker group."""
        device = credentials.device_id
        group = (self.device_groups.get(device) or own_group(device)) if device else None
        return Identity(device, credentials.client_id, group, group_fixed=self.enabled)

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

    def check(self, credentials: Credentials) -> AuthDecision:
        """Accepted credentials come back as the decision's `identity`."""
        if not self.enabled:
            return AuthDecision(True, "authentication disabled", identity=self.identity(credentials))
        if not self.secret and credentials.device_id not in self.allowed_devices:
            return AuthDecision(
                False, f"device authentication is on but {self.secret_env} is not set on the server", NOT_CONFIGURED
            )
        decision = check_device(
            credentials.authorization,
            credentials.client_id,
            credentials.device_id,
            self.secret,
            self.max_age_s,
            self.allowed_devices,
        )
        return AuthDecision(True, decision.reason, identity=self.identity(credentials)) if decision.ok else decision


class AdminAuth:
    """The bearer token of the admin API (`/v1/speakers*`), from the environment."""

    def __init__(self, token: str, env_name: str):
        self.token, self.env_name = token, env_name

    @classmethod
    def from_settings(cls, security: SecuritySettings, environ: Mapping[str, str] = os.environ) -> AdminAuth:
        """InsecureSecret if the token is set but too short."""
        token = environ.get(security.admin_token_env, "")
        return cls(check_secret(token, security.admin_token_env, security.min_secret_chars), security.admin_token_env)

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


def request_target(scope: dict) -> str:
    """Path and query of a request, for refusal logs (the redaction filter masks any token)."""
    query = scope.get("query_string", b"").decode("latin-1")
    return scope.get("path", "") + (f"?{query}" if query else "")


def require_device(auth: DeviceAuth, request: Request) -> Identity:
    """Device authentication of an HTTP request (file uploads): 400/401/403/503 before the body is
    read. Returns who the request is."""
    try:
        decision = auth.check(device_credentials(request.headers, request.query_params))
    except CredentialError as exc:
        decision = AuthDecision(False, str(exc), exc.status)
    if not decision.ok:
        logger.warning("refused %s: %s", request_target(request.scope), decision.reason)
        headers = {"WWW-Authenticate": "Bearer"} if decision.status == MISSING else None
        raise HTTPException(decision.status, decision.reason, headers=headers)
    return decision.identity


def require_admin(auth: AdminAuth, request: Request) -> None:
    """The admin token, before anything else the request carries is looked at (form, JSON body)."""
    decision = auth.check(request.headers.get("authorization"))
    if not decision.ok:
        logger.warning("refused %s %s: %s", request.method, request.url.path, decision.reason)
        headers = {"WWW-Authenticate": "Bearer"} if decision.status == MISSING else None
        raise HTTPException(decision.status, decision.reason, headers=headers)

"""Who may connect and what one client may make the ingress do: device tokens on every device
path, the admin token, log redaction, in-memory uploads, per-session limits.

Device tokens (minted by speech_serve/wire/tokens.py) are the Xiaozhi reference server's. Xiaozhi devices
send them in headers; plain, FunASR and Realtime clients (OpenAI's SDK sends its api_key as a
bearer token), and file uploads, may use `Authorization: Bearer <token>` or the `token` query
parameter (FunASR clients and browsers cannot always set headers), with `Device-Id` /
`device_id` and optionally `Client-Id` / `client_id`. The admin API
(`/v1/speakers*`) takes a bearer token from the environment.

Identity is decided once per connection: `device_credentials` is the one parser of credentials
(every protocol, the file endpoint), `DeviceAuth.check` authenticates them and returns the
`Identity` the session is then admitted, counted and matched under (its speaker group too).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from fastapi import HTTPException
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from speech_serve.messages import SAMPLE_RATE
from speech_serve.settings import MIN_REDACTED_CHARS, IngressSettings, SecuritySettings
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
        group = self.device_groups.get(device, device) if device else None
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


# ---- log redaction ------------------------------------------------------------------------
# Keep credentials out of the logs: a logging filter that masks tokens in every record.
#
# Masked: `token=` (and similar) query or form parameters, `Authorization` header values in
# any of the shapes they get logged in (`Authorization: Bearer x`, a dict repr, an ASGI header
# tuple), `Bearer <x>` anywhere, device-token values (`<43 base64url chars>.<unix time>`), and
# the literal values of the secrets this process holds (device secret, admin token).


MASK = "[REDACTED]"
MIN_SECRET_LEN = MIN_REDACTED_CHARS  # shorter "secrets" would mask ordinary words; check_secret refuses them

_PARAM = re.compile(
    r"(?i)\b(token|access_token|authorization|api_key|apikey|password|secret)=(?!\[REDACTED\])([^&\s\"'<>#:,;)\]}]+)"
)
_HEADER = re.compile(  # atomic groups: no backtracking that would let "Bearer" itself pass as the value
    r"(?i)\b(authorization|proxy-authorization|x-api-key)(?>(\"?'?\s*[:,=]\s*(?:(?-i:b)?[\"'])?))"
    r"(?>(?:bearer\s+|basic\s+)?)(?![<\[])[^\s\"',;}\])]+"  # not `Bearer <token>` in a help text, nor a mask
)
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+")
# base64url(HMAC-SHA256).unix_time; not \b at the start: a token may begin with "-" (1 in 32)
_DEVICE_TOKEN = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}\.\d{9,11}\b")


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


# ---- uploads --------------------------------------------------------------------------------
# Multipart uploads held in memory only: uploaded audio never touches the disk.
#
# Starlette (which FastAPI's `File()` / `UploadFile` parameters use) spools every file part into
# a `SpooledTemporaryFile` that rolls over to a temporary file on disk past 1 MiB. Here the
# spool limit is raised to the upload limit, and a file that would pass the limit is refused
# (413) before its bytes are written, so the spool never rolls over. Memory per request is
# bounded by max_files x max_file_bytes.


MAX_FORM_FIELDS = 32  # text fields per form: ours use 4; room for OpenAI clients' extras
MAX_FIELD_BYTES = 64 * 1024  # one text field (a name, a language code)


class UploadError(ValueError):
    """A bad upload: `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class InMemoryMultiPartParser(MultiPartParser):
    def __init__(self, headers: Headers, stream, *, max_file_bytes: int, max_files: int):
        super().__init__(
            headers, stream, max_files=max_files, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES
        )
        self.spool_max_size = max_file_bytes  # rolls over only past this, which on_part_data never allows
        self.max_file_bytes = max_file_bytes
        self._file_bytes = 0

    def on_part_begin(self) -> None:
        super().on_part_begin()
        self._file_bytes = 0

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current_part.file is not None:
            self._file_bytes += end - start
            if self._file_bytes > self.max_file_bytes:
                raise UploadError(413, f"each file must be at most {self.max_file_bytes} bytes")
        super().on_part_data(data, start, end)


async def read_form(request: Request, max_file_bytes: int, max_files: int) -> FormData:
    """The request's form, files in memory. Raises UploadError."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            parser = InMemoryMultiPartParser(
                request.headers, request.stream(), max_file_bytes=max_file_bytes, max_files=max_files
            )
            return await parser.parse()
        # url-encoded or no body: no file parts, so nothing to spool
        return await request.form(max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD_BYTES)
    except MultiPartException as exc:
        raise UploadError(400, exc.message) from None


async def read_upload_form(request: Request, max_file_bytes: int, max_files: int, timeout_s: float) -> FormData:
    """`read_form`, with a bad upload answered as its HTTP error, and a body that has not all
    arrived within `timeout_s` as 408."""
    try:
        async with asyncio.timeout(timeout_s):
            return await read_form(request, max_file_bytes, max_files)
    except UploadError as exc:
        raise HTTPException(exc.status, str(exc)) from None
    except TimeoutError:
        raise HTTPException(408, f"the upload's body did not arrive within {timeout_s:g} s") from None


def text_field(form: FormData, name: str, default: str | None = None, required: bool = False) -> str | None:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise UploadError(422, f"form field {name!r} must be text, not a file")
    if value is None and required:
        raise UploadError(422, f"missing form field {name!r}")
    return default if value is None else value


def file_fields(form: FormData, name: str) -> list[UploadFile]:
    files = [v for v in form.getlist(name) if isinstance(v, UploadFile)]
    if not files:
        raise UploadError(422, f"missing file field {name!r}: send the audio as multipart/form-data")
    return files


# ---- per-session limits (pure: the clock is injected) -----------------------------------------


class SessionLimitExceeded(Exception):
    """The client went past a per-session bound; the session is closed with `code` (1008)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class TokenBucket:
    """`burst` events at once, then `rate_per_s` sustained."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate_per_s, self.burst = rate_per_s, burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now

    def take(self, cost: float = 1) -> bool:
        """One event of `cost` tokens: True if within the bound (and counted), False if over it."""
        self._refill()
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True

    def debit(self, cost: float) -> float:
        """Count `cost` tokens even past the bound; return the seconds to wait before going on
        so that the sustained rate holds (0 while within the burst)."""
        self._refill()
        self._tokens -= cost
        return max(0.0, -self._tokens / self.rate_per_s)


def frame_size(message: Mapping) -> int:
    """Bytes of a received WebSocket frame (characters for text: a cheap lower bound)."""
    data = message.get("bytes")
    if data is not None:
        return len(data)
    return len(message.get("text") or "")


class SessionIntake:
    """What one WebSocket client may send, for every protocol (pure: the clock is injected).

    Refused as frames arrive (`arrived`, before they are queued for the session's frame loop):
    more frames per second than `max_frames_per_s` (a flood of tiny frames), and text frames over
    `max_text_frame_bytes`; each raises SessionLimitExceeded. Slowed, never refused (a client that
    sends a file faster than real time, as FunASR's own offline client does, is a client):
    - audio past `max_audio_rate` x real time (`audio_wait`, 16 kHz samples): the session waits
      before the audio goes on, so it costs VAD and model work at that rate at most;
    - bytes received but not yet handled past `max_queued_bytes` (`behind`): the reader stops
      reading the socket until the frame loop catches up, and TCP slows the client down.
    The rates are token buckets over `rate_window_s`: a client may be a window's worth ahead
    (network jitter, a short file sent at once) before the sustained rate applies.
    """

    def __init__(self, limits: IngressSettings, clock: Callable[[], float] = time.monotonic):
        window = limits.rate_window_s
        self.limits = limits
        self._frames = TokenBucket(limits.max_frames_per_s, max(1, round(limits.max_frames_per_s * window)), clock)
        rate = limits.max_audio_rate
        self._audio = (
            None if rate is None else TokenBucket(rate * SAMPLE_RATE, round(rate * window * SAMPLE_RATE), clock)
        )
        self.queued_bytes = 0
        self.paced_s = 0.0  # how long this session's audio was held back, in all

    def arrived(self, message: Mapping) -> None:
        """A frame just read from the socket, before it is queued."""
        limits = self.limits
        text = message.get("text")
        if text is not None and len(text) * 4 > limits.max_text_frame_bytes:  # else it fits, whatever it holds
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > limits.max_text_frame_bytes:
                raise SessionLimitExceeded(
                    "frame_too_large", f"text frame of {size} bytes exceeds {limits.max_text_frame_bytes}"
                )
        if not self._frames.take():
            raise SessionLimitExceeded(
                "too_many_messages",
                f"more than {limits.max_frames_per_s:g} frames per second (over {limits.rate_window_s:g} s)",
            )
        self.queued_bytes += frame_size(message)

    @property
    def behind(self) -> bool:
        """More received than handled than `max_queued_bytes`: stop reading until it is not."""
        return self.queued_bytes > self.limits.max_queued_bytes

    def handled(self, message: Mapping) -> None:
        """The frame loop took the frame from the queue."""
        self.queued_bytes -= frame_size(message)

    def audio_wait(self, samples: int) -> float:
        """16 kHz samples about to go to the session's utterance stream: the seconds to hold them
        back first (0 within `max_audio_rate`)."""
        if self._audio is None:
            return 0.0
        wait = self._audio.debit(samples)
        self.paced_s += wait
        return wait


class Slots:
    """At most `limit` holders at once (uploads on one Ingress replica). `take()` answers at once,
    never queues: a waiting upload would hold its body in memory, and its client would not know
    why nothing happens."""

    def __init__(self, limit: int, retry_after_s: int = 5):
        self.limit, self.retry_after_s = limit, retry_after_s
        self.held = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        """One slot for the block, or HTTP 503 with Retry-After at once."""
        if not self.take():
            raise HTTPException(
                503,
                f"this server is handling {self.limit} uploads already; retry later",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        try:
            yield
        finally:
            self.give()

    def take(self) -> bool:
        if self.held >= self.limit:
            return False
        self.held += 1
        return True

    def give(self) -> None:
        self.held -= 1

"""Device tokens, as the Xiaozhi reference server makes them: `<sig>.<ts>`, where
sig = base64url-without-padding(HMAC-SHA256(secret, "client_id|device_id|ts")).

The token names neither device nor client: both come with the connection and the server signs
them again (speech_serve/ingress/auth.py), so a token works only for the device (and client, if
one was named) it was issued to.

Ids may not contain "|": with it, client "a|b" + device "c" and client "a" + device "b|c" signed
the same string, so one token opened two identities. Migration: none for ids without "|" (every
token issued before signs and verifies exactly as it did, and as the Xiaozhi reference server's);
a device or client id containing "|" is refused by the server (400) and here: rename it and
issue it a new token. Secrets shorter than MIN_SECRET_CHARS are refused here and by the server.

Mint a token (the secret is read from the environment, never from an argument):

    SPEECH_SERVE_DEVICE_SECRET=... speech-serve token --device-id aa:bb:cc:dd:ee:ff
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from urllib.parse import urlencode

DEFAULT_SECRET_ENV = "SPEECH_SERVE_DEVICE_SECRET"  # the server's security.device_secret_env default
DEFAULT_ADMIN_TOKEN_ENV = "SPEECH_SERVE_ADMIN_TOKEN"  # the server's security.admin_token_env default
MIN_SECRET_CHARS = 16  # the server's security.min_secret_chars default
SEPARATOR = "|"  # between the signed fields; ids may not contain it


def sign(secret: str, client_id: str, device_id: str, ts: int) -> str:
    """Raises ValueError for an id containing SEPARATOR (the signed string would be ambiguous)."""
    if SEPARATOR in client_id or SEPARATOR in device_id:
        raise ValueError(f"device and client ids may not contain {SEPARATOR!r}")
    digest = hmac.new(secret.encode(), f"{client_id}|{device_id}|{ts}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def issue_token(secret: str, client_id: str, device_id: str, now: float | None = None) -> str:
    """A device token. `client_id` may be "" for clients that send none (plain, FunASR)."""
    ts = int(time.time() if now is None else now)
    return f"{sign(secret, client_id, device_id, ts)}.{ts}"


def device_headers(device_id: str | None, token: str | None) -> dict[str, str]:
    """The headers that carry a device's credentials."""
    headers = {"Device-Id": device_id} if device_id else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


def url_with_token(url: str, device_id: str | None, token: str | None) -> str:
    """The credentials as query parameters, for clients that cannot set headers."""
    params = {k: v for k, v in (("device_id", device_id), ("token", token)) if v}
    return f"{url}{'&' if '?' in url else '?'}{urlencode(params)}" if params else url

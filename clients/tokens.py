"""Device tokens, as the Xiaozhi reference server makes them: `<sig>.<ts>`, where
sig = base64url-without-padding(HMAC-SHA256(secret, "client_id|device_id|ts")).

The token names neither device nor client: both come with the connection and the server signs
them again (serve_app/ingress/security.py), so a token works only for the device (and client, if
one was named) it was issued to.

Mint a token (the secret is read from the environment, never from an argument):

    SPEECH_SERVE_DEVICE_SECRET=... python -m clients.tokens --device-id aa:bb:cc:dd:ee:ff
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import os
import time
from urllib.parse import urlencode

DEFAULT_SECRET_ENV = "SPEECH_SERVE_DEVICE_SECRET"  # the server's security.device_secret_env default


def sign(secret: str, client_id: str, device_id: str, ts: int) -> str:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Mint a device token (the secret comes from the environment).")
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--client-id", default="", help="Xiaozhi devices send one; plain and FunASR clients need not")
    parser.add_argument("--secret-env", default=DEFAULT_SECRET_ENV)
    args = parser.parse_args(argv)
    secret = os.environ.get(args.secret_env)
    if not secret:
        raise SystemExit(f"set {args.secret_env} to the server's device secret first")
    print(issue_token(secret, args.client_id, args.device_id))


if __name__ == "__main__":
    main()

"""Mint device tokens (the secret is read from the environment, never from an argument).

    SPEECH_SERVE_DEVICE_SECRET=... speech-serve token --device-id aa:bb:cc:dd:ee:ff   # one token, printed
    SPEECH_SERVE_DEVICE_SECRET=... speech-serve token issue --count 500 --out devices.csv [--prefix kitchen-]

`issue --count` writes device_id,client_id,token rows to a new file only its owner can read (0600) and
prints only how many it wrote: the tokens are credentials. Device ids are random locally administered
MAC addresses (02:xx:xx:xx:xx:xx), or `<prefix><n>` with --prefix; client ids are random UUIDs as
Xiaozhi devices send (--no-client-id: empty, for plain and FunASR clients).
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import sys
import uuid
from pathlib import Path

from speech_serve.wire.tokens import DEFAULT_SECRET_ENV, MIN_SECRET_CHARS, issue_token

CSV_FIELDS = ("device_id", "client_id", "token")
FILE_MODE = 0o600  # the owner only: every row is a credential
LOCAL_MAC_FIRST_OCTET = 0x02  # locally administered, unicast: never a vendor's real address
MAC_RANDOM_OCTETS = 5


def device_secret(env_name: str) -> str:
    secret = os.environ.get(env_name)
    if not secret:
        raise SystemExit(f"set {env_name} to the server's device secret first")
    if len(secret) < MIN_SECRET_CHARS:
        raise SystemExit(f"the secret in {env_name} must be at least {MIN_SECRET_CHARS} characters")
    return secret


def device_ids(count: int, prefix: str | None) -> list[str]:
    """`count` distinct device ids: `<prefix><n>` (zero-padded), or random local MAC addresses."""
    if prefix is not None:
        width = len(str(count))
        return [f"{prefix}{n:0{width}d}" for n in range(1, count + 1)]
    ids: dict[str, None] = {}  # ordered and distinct
    while len(ids) < count:
        octets = [LOCAL_MAC_FIRST_OCTET, *secrets.token_bytes(MAC_RANDOM_OCTETS)]
        ids[":".join(f"{o:02x}" for o in octets)] = None
    return list(ids)


def write_tokens(out: Path, secret: str, ids: list[str], with_client_id: bool, now: float | None = None) -> int:
    """Write one row per device to a new file created 0600; refuses to replace an existing file (it may
    hold tokens already handed out)."""
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        raise SystemExit(f"{out} exists: choose another --out (it may hold tokens already handed out)") from None
    os.fchmod(fd, FILE_MODE)  # whatever the umask
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for device_id in ids:
            client_id = str(uuid.uuid4()) if with_client_id else ""
            writer.writerow((device_id, client_id, issue_token(secret, client_id, device_id, now)))
    return len(ids)


def issue_many(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="speech-serve token issue", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--count", type=int, required=True, help="how many devices")
    parser.add_argument("--out", type=Path, required=True, help="a new CSV file (created 0600)")
    parser.add_argument("--prefix", help="device ids <prefix>1..N instead of random local MAC addresses")
    parser.add_argument("--no-client-id", action="store_true", help="empty client ids (plain and FunASR clients)")
    parser.add_argument("--secret-env", default=DEFAULT_SECRET_ENV)
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if args.prefix is not None and "|" in args.prefix:
        parser.error("--prefix may not contain '|' (the signed fields' separator)")
    secret = device_secret(args.secret_env)
    written = write_tokens(args.out, secret, device_ids(args.count, args.prefix), not args.no_client_id)
    print(f"wrote {written} device tokens to {args.out} (mode 600: keep it that way, every row is a credential)")


def issue_one(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="speech-serve token", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--client-id", default="", help="Xiaozhi devices send one; plain and FunASR clients need not")
    parser.add_argument("--secret-env", default=DEFAULT_SECRET_ENV)
    args = parser.parse_args(argv)
    secret = device_secret(args.secret_env)
    try:
        print(issue_token(secret, args.client_id, args.device_id))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["issue"] and not any(a.startswith("--device-id") for a in args):
        issue_many(args[1:])
    else:  # `token --device-id X`, and `token issue --device-id X`: one token, printed
        issue_one(args[1:] if args[:1] == ["issue"] else args)


if __name__ == "__main__":
    main()

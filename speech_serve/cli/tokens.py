"""Mint a device token (the secret is read from the environment, never from an argument).

    SPEECH_SERVE_DEVICE_SECRET=... speech-serve token --device-id aa:bb:cc:dd:ee:ff
"""

from __future__ import annotations

import argparse
import os

from speech_serve.wire.tokens import DEFAULT_SECRET_ENV, MIN_SECRET_CHARS, issue_token


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="speech-serve token", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--client-id", default="", help="Xiaozhi devices send one; plain and FunASR clients need not")
    parser.add_argument("--secret-env", default=DEFAULT_SECRET_ENV)
    args = parser.parse_args(argv)
    secret = os.environ.get(args.secret_env)
    if not secret:
        raise SystemExit(f"set {args.secret_env} to the server's device secret first")
    if len(secret) < MIN_SECRET_CHARS:
        raise SystemExit(f"the secret in {args.secret_env} must be at least {MIN_SECRET_CHARS} characters")
    try:
        print(issue_token(secret, args.client_id, args.device_id))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()

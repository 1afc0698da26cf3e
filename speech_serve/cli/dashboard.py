"""Talking to the Ray dashboard's Serve REST API (`/api/serve/applications/`).

Ray 2.60 turns on token authentication by default: requests carry
`Authorization: Bearer <token>`, the token taken from $RAY_AUTH_TOKEN or ~/.ray/auth_token
(written by the Ray node on this machine).
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
APPLICATIONS = "/api/serve/applications/"


def auth_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = Path.home() / ".ray" / "auth_token"
        token = path.read_text().strip() if path.exists() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}

"""`GET /demo`: a static page where a person talks to the service (index.html, its script, style
and AudioWorklet, all served from here: no build step, no CDN). The page speaks the OpenAI Realtime
transcription protocol (`/v1/realtime`), so it is also a worked example of a browser client."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import Response

ASSETS = Path(__file__).with_name("demo")
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Only our own files run: scripts, styles, the worklet and the WebSocket all from this origin.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@cache
def _asset(name: str) -> tuple[bytes, str] | None:
    path = ASSETS / name
    # A fixed set of names (the folder's own files): nothing from the request reaches the filesystem.
    if name not in {p.name for p in ASSETS.iterdir()} or path.suffix not in _TYPES:
        return None
    return path.read_bytes(), _TYPES[path.suffix]


def demo_asset(name: str = "index.html") -> Response:
    """One file of the page, or 404."""
    found = _asset(name)
    if found is None:
        raise HTTPException(status_code=404, detail=f"no demo file {name!r}")
    body, media_type = found
    return Response(body, media_type=media_type, headers=_HEADERS)

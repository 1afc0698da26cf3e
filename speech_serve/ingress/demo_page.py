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
def _assets() -> dict[str, tuple[bytes, str]]:
    """The folder's own files, read once. A fixed set: nothing from a request reaches the filesystem,
    and a request for another name adds nothing to memory (the cache is keyed by nothing)."""
    return {p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in ASSETS.iterdir() if p.suffix in _TYPES}


def demo_asset(name: str = "index.html") -> Response:
    """One file of the page, or 404."""
    found = _assets().get(name)
    if found is None:
        raise HTTPException(status_code=404, detail=f"no demo file {name!r}")
    body, media_type = found
    return Response(body, media_type=media_type, headers=_HEADERS)

"""A local Hugging Face hub for `speech-serve models fetch` (HfApi and snapshot_download pointed at it through
their `endpoint`): the three calls the client makes, served from model folders on disk.

    GET  /api/models/<id>[/revision/<rev>]   the repo's commit and files (size, git blob id, LFS sha256)
    HEAD /<id>/resolve/<rev>/<file>          the file's commit, etag and size
    GET  /<id>/resolve/<rev>/<file>          its bytes

`corrupt` names files served with other bytes than the listing describes (a truncated or tampered download)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_ABOVE_BYTES = 1024  # files larger than this are listed as LFS files (a sha256), the rest by git blob id


def _listing(model_id: str, folder: Path) -> dict:
    siblings = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        entry = {"rfilename": str(path.relative_to(folder)), "size": len(data),
                 "blobId": hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()}  # fmt: skip
        if len(data) > LFS_ABOVE_BYTES:
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        siblings.append(entry)
    return {"id": model_id, "modelId": model_id, "sha": COMMIT, "private": False, "siblings": siblings}


class FakeHub:
    def __init__(self, models: dict[str, Path], corrupt: frozenset[str] = frozenset()) -> None:
        self.models, self.corrupt, self.requests = models, corrupt, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                path = self.path.split("?")[0]
                for model_id, folder in hub.models.items():
                    if path in (f"/api/models/{model_id}", f"/api/models/{model_id}/revision/main"):
                        return self._send(json.dumps(_listing(model_id, folder)).encode(), body, "application/json")
                    prefix = f"/{model_id}/resolve/"
                    if path.startswith(prefix):
                        name = path.removeprefix(prefix).split("/", 1)[1]
                        file = folder / name
                        if file.is_file():
                            data = file.read_bytes()
                            etag = hashlib.sha256(data).hexdigest()
                            if name in hub.corrupt:
                                data = bytes(len(data))  # same size, other bytes
                            return self._send(data, body, "application/octet-stream", etag)
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _send(self, data: bytes, body: bool, kind: str, etag: str | None = None) -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Repo-Commit", COMMIT)
                if etag:
                    self.send_header("ETag", f'"{etag}"')
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

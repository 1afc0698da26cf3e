"""Devices that keep a real service busy: plain-protocol clients streaming two_utterances.wav in a
loop at real-time pace (scaling and node-loss tests), and waiting for a cluster to get somewhere."""

from __future__ import annotations

import json
import threading
import time
import wave

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from speech_serve.wire.codes import CLOSE_SERVICE_RESTART
from tests.support.audio import TWO_UTTERANCES_WAV

UTTERANCES_PER_LOOP = 2  # two_utterances.wav; 1.7 s of silence joins one loop to the next


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as exc:  # the head node is still coming up
            last = exc
        time.sleep(1)
    raise AssertionError(f"{what} not reached in {timeout_s} s (last: {last})")


class LoopingDevice(threading.Thread):
    """A plain-protocol client streaming two_utterances.wav in a loop at real-time pace. It
    stops at a loop boundary when asked, and reconnects (carrying on where it was in the
    audio) when the server closes with 1012, as a device would."""

    def __init__(self, url: str, frame_ms: int = 100):
        super().__init__(daemon=True)
        with wave.open(str(TWO_UTTERANCES_WAV), "rb") as w:
            self.pcm = w.readframes(w.getnframes())
        self.url, self.frame_bytes, self.frame_s = url, 16 * frame_ms * 2, frame_ms / 1000
        self.stop = threading.Event()
        self.sent = 0  # bytes of audio taken by the service, over all connections (loops x file size)
        self.connections: list[dict] = []  # per connection: results, close code, error frames
        self.failure: BaseException | None = None
        self.refused_at_connect = 0  # refused by a stopping replica at connect (1012), then reconnected

    @property
    def loops(self) -> int:
        return self.sent // len(self.pcm)

    @property
    def results(self) -> int:
        return sum(len(c["results"]) for c in self.connections)

    @property
    def moved(self) -> int:
        return sum(c["close"] == CLOSE_SERVICE_RESTART for c in self.connections)

    def run(self) -> None:
        try:
            while self._connection():
                pass
        except BaseException as exc:  # reported by the test
            self.failure = exc

    def _connection(self) -> bool:
        """Stream from `self.sent` on; True if the service asked us to reconnect."""
        start, n = self.sent, len(self.pcm)
        pos = start
        conn = {"results": [], "close": None, "errors": [], "done": None}
        with connect(self.url + "/v1/stream", max_size=None, open_timeout=30) as ws:
            hello = json.loads(ws.recv(timeout=60))
            if hello.get("code") == "reconnect":
                # A replica that has just begun to stop refuses new sessions with 1012 (a connection
                # the proxy routed to it a moment before); a device reconnects, as after a move.
                self.refused_at_connect += 1
                return True
            assert hello["type"] == "ready", hello
            self.connections.append(conn)
            ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            assert (started := json.loads(ws.recv(timeout=60)))["type"] == "ready", started
            reader = threading.Thread(target=self._read, args=(ws, conn), daemon=True)
            reader.start()
            next_at = time.monotonic()
            while conn["close"] is None:
                if pos % n == 0 and pos > start and self.stop.is_set():  # a loop boundary
                    ws.send(json.dumps({"type": "end"}))
                    reader.join(60)
                    self.sent = pos
                    return False
                frame = self.pcm[pos % n : min(pos % n + self.frame_bytes, n)]
                try:
                    ws.send(frame)
                except ConnectionClosed:
                    break
                pos += len(frame)
                next_at += self.frame_s
                time.sleep(max(0.0, next_at - time.monotonic()))
            reader.join(30)
        assert conn["close"] == CLOSE_SERVICE_RESTART, f"closed with {conn['close']}: {conn['errors']}"
        # Frames sent after the server stopped reading are gone: resend from what it took.
        self.sent = start + conn["errors"][-1]["received_ms"] * 32  # bytes of 16 kHz PCM16
        return True

    def _read(self, ws, conn: dict) -> None:
        try:
            while True:
                msg = json.loads(ws.recv(timeout=120))
                if msg["type"] == "result":
                    conn["results"].append(msg["index"])
                elif msg["type"] == "done":
                    conn["done"] = msg["utterances"]
                    return
                else:
                    conn["errors"].append(msg)
        except ConnectionClosed as exc:
            conn["close"] = exc.rcvd.code if exc.rcvd else None


def finish_devices(devices: list[LoopingDevice]) -> None:
    for d in devices:
        d.stop.set()
    for d in devices:
        d.join(90)
    for d in devices:
        assert not d.is_alive() and d.failure is None, d.failure
        assert d.results == UTTERANCES_PER_LOOP * d.loops, (d.loops, d.connections)  # nothing lost or doubled
        for c in d.connections:
            assert c["results"] == list(range(len(c["results"]))), c  # in order, once each
        assert d.connections[-1]["done"] == len(d.connections[-1]["results"])

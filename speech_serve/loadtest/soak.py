"""Soak test: long sessions, replica loss and connection churn against a running service.

    speech-serve soak --url ws://127.0.0.1:8000 --audio-hours 1 --sessions 2 --churn 500 \\
        --kill SenseVoice,Speaker --kill-every 30 --out loadtest/results/soak-1h

1. Reference: one undisturbed plain-protocol session streams the clip (default
   tests/fixtures/two_utterances.wav, padded with silence to whole VAD chunks) twice. Its
   results are what every loop must give: loop 0 as its first loop, every later loop as its
   second (from then on the VAD has only silence behind it, so boundaries repeat exactly).
2. Long sessions: `--sessions` sessions stream the clip in a loop, `--audio-hours` of audio
   each, as fast as the service answers (faster than real time; `--speed` caps it). Every
   `--kill-every` s a replica of the next deployment in `--kill` is killed while it has a
   request in flight. Every utterance must get exactly one result, in order, with the
   reference's boundaries and text.
3. Churn: `--churn` cycles of connect / stream / disconnect over the plain, Xiaozhi and FunASR
   protocols, `--concurrency` at a time. One cycle in three streams the whole clip and says
   goodbye (its results are checked); one drops the TCP connection mid-stream; one closes the
   WebSocket mid-stream without a goodbye. Afterwards the service must hold no session state:
   live sessions and runner tasks on the Ingress (/healthz), live sessions on every VADHost.

Memory: RSS of every Ingress and VADHost replica process (from /proc, so run it on the
service's machine), sampled as it goes; `before` once `--warmup` of the audio has streamed,
`after` at the end of the long sessions and again after the churn. Replica processes and
VADHost sessions come from a Ray driver on the service's cluster (`--ray-address`, default
`auto`); without one, those figures are left out. A progress line every `--progress-s`
seconds; the summary goes to `<out>/summary.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from speech_serve.loadtest.loadgen import connect_device, handshake
from speech_serve.loadtest.records import FRAME_MS, FRAME_SAMPLES
from speech_serve.wire.opus import encode_pcm
from speech_serve.wire.tokens import DEFAULT_ADMIN_TOKEN_ENV, DEFAULT_SECRET_ENV
from speech_serve.wire.xiaozhi import frame_audio

DEFAULT_CLIP = "tests/fixtures/two_utterances.wav"
PROTOCOLS = ("plain", "xiaozhi", "funasr")
CHURN_KINDS = ("goodbye", "drop", "close")  # say goodbye; drop TCP mid-stream; close the WebSocket mid-stream


# ---- the audio -------------------------------------------------------------------------------
def load_clip(path: str, chunk_ms: int) -> np.ndarray:
    """A 16 kHz mono int16 clip padded with silence to whole VAD chunks, so that every loop meets
    the VAD at the same chunk phase and repeats the same utterance boundaries."""
    import soundfile as sf

    data, rate = sf.read(path, dtype="int16", always_2d=True)
    pcm = data.mean(axis=1).astype(np.int16)
    if rate != 16000:
        import soxr

        pcm = soxr.resample(pcm, rate, 16000)
    step = chunk_ms * 16
    return np.concatenate([pcm, np.zeros((-len(pcm)) % step, dtype=np.int16)])


@dataclass(frozen=True)
class Expected:
    """One utterance as the reference run gave it: offsets within its loop, and text."""

    start_ms: int
    end_ms: int
    text: str


@dataclass(frozen=True)
class Reference:
    loop_ms: int
    first: list[Expected]  # loop 0 of a session
    steady: list[Expected]  # every later loop

    def expected(self, loops: int) -> list[tuple[int, int, str]]:
        """(start_ms, end_ms, text) of every utterance of `loops` loops, in stream time."""
        out = []
        for k in range(loops):
            for e in self.first if k == 0 else self.steady:
                out.append((e.start_ms + k * self.loop_ms, e.end_ms + k * self.loop_ms, e.text))
        return out


def reference_from(results: list[dict], loop_ms: int) -> Reference:
    by_loop: dict[int, list[Expected]] = {0: [], 1: []}
    for r in results:
        k = r["start_ms"] // loop_ms
        by_loop[k].append(Expected(r["start_ms"] - k * loop_ms, r["end_ms"] - k * loop_ms, r["text"]))
    if not by_loop[0] or len(by_loop[0]) != len(by_loop[1]):
        raise RuntimeError(f"the reference run found {len(by_loop[0])} and {len(by_loop[1])} utterances in its loops")
    return Reference(loop_ms, by_loop[0], by_loop[1])


# ---- one plain-protocol session ----------------------------------------------------------------
@dataclass
class SessionLog:
    """What one session sent and got back."""

    loops: int = 0  # whole loops of the clip sent
    audio_s: float = 0.0  # sent so far
    answered_to_s: float = 0.0  # end of the last answered utterance
    messages: list[dict] = field(default_factory=list)
    closed_early: str | None = None  # set when the server closed before `done`

    @property
    def results(self) -> list[dict]:
        return [m for m in self.messages if m.get("type") == "result"]

    @property
    def errors(self) -> list[dict]:
        return [m for m in self.messages if m.get("type") == "error"]

    @property
    def done(self) -> dict | None:
        return next((m for m in self.messages if m.get("type") == "done"), None)


async def stream_session(
    url: str, clip: np.ndarray, loops: int, log: SessionLog, speed: float | None = None,
    ahead_s: float | None = None, stop: asyncio.Event | None = None, start: dict | None = None,
    frame_samples: int = FRAME_SAMPLES * 4, result_timeout_s: float = 300, device: int = 0,
    auth_secret: str | None = None,
) -> SessionLog:  # fmt: skip
    """Stream `clip` `loops` times over the plain protocol (or fewer: `stop` ends it at the next
    loop boundary), say `end`, and collect every message until `done`.

    Pace: `speed` x real time, or unpaced; with `ahead_s`, never more than that much audio beyond
    the end of the last answered utterance. Unpaced audio otherwise piles up in socket and Serve
    proxy buffers, which would measure the buffers rather than the service."""
    answered = asyncio.Event()
    async with connect_device(url, "plain", device, auth_secret) as ws:
        await handshake(ws, "plain", device)
        if start is not None:
            await ws.send(json.dumps({"type": "start", **start}))
            await asyncio.wait_for(ws.recv(), 15)  # the second ready

        async def receive() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                log.messages.append(msg)
                if msg.get("type") == "result":
                    log.answered_to_s = msg["end_ms"] / 1000
                    answered.set()
                if msg.get("type") == "done":
                    return
            log.closed_early = f"closed {ws.close_code} {ws.close_reason}"
            answered.set()

        receiver = asyncio.create_task(receive())
        t0 = time.monotonic()
        while log.loops < loops and not (stop is not None and stop.is_set()) and not receiver.done():
            for i in range(0, len(clip), frame_samples):
                while ahead_s is not None and log.audio_s - log.answered_to_s > ahead_s and not receiver.done():
                    answered.clear()
                    await asyncio.wait_for(answered.wait(), result_timeout_s)
                await ws.send(clip[i : i + frame_samples].tobytes())
                log.audio_s += min(frame_samples, len(clip) - i) / 16000
                if speed:
                    ahead = t0 + log.audio_s / speed - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            log.loops += 1
        await ws.send(json.dumps({"type": "end"}))
        await asyncio.wait_for(receiver, result_timeout_s)
    return log


def check_session(log: SessionLog, expected: list[tuple[int, int, str]]) -> dict:
    """Lost, duplicated, out-of-order and wrong results of one session against the reference."""
    results = log.results
    indices = [r["index"] for r in results]
    got = {(r["start_ms"], r["end_ms"]): r["text"] for r in results}
    want = {(a, b): text for a, b, text in expected}
    return {
        "expected": len(expected),
        "answered": len(results),
        "lost": len(set(want) - set(got)),
        "unexpected": len(set(got) - set(want)),
        "duplicated": len(indices) - len(set(indices)),
        "in_order": indices == list(range(len(results))),
        "wrong_text": sum(1 for k, text in want.items() if k in got and got[k] != text),
        "errors": len(log.errors),
        "done": log.done is not None and log.done.get("utterances") == len(results),
        "closed_early": log.closed_early,
        "retried": sum(1 for r in results if r.get("retries")),
    }


# ---- the service's processes, through a Ray driver ----------------------------------------------
class Probe:
    """Replica actors of one Serve application: pids, RSS, VADHost live sessions, kills. Needs
    `ray.init` in this process on the service's cluster; RSS needs its machine's /proc."""

    def __init__(self, app: str = "speech"):
        self.app = app

    def replicas(self, deployment: str) -> dict[str, object]:
        """name -> actor handle of the deployment's live replica actors."""
        import ray

        out = {}
        for n in ray.util.list_named_actors(all_namespaces=True):
            if n["name"].startswith("SERVE_REPLICA::") and f"{self.app}#{deployment}#" in n["name"]:
                try:
                    out[n["name"]] = ray.get_actor(n["name"], namespace=n["namespace"])
                except ValueError:  # gone between the listing and the lookup
                    pass
        return out

    def pids(self, deployments: tuple[str, ...] = ("Ingress", "VADHost")) -> dict[str, int]:
        """`Deployment#replica` -> pid, and `proxy#node` for the Serve proxies (each WebSocket passes
        through one)."""
        import ray

        out = {}
        for n in ray.util.list_named_actors(all_namespaces=True):
            if n["name"].startswith("SERVE_PROXY_ACTOR"):
                try:
                    proxy = ray.get_actor(n["name"], namespace=n["namespace"])
                    out["proxy#" + n["name"].rsplit("-", 1)[-1][:8]] = ray.get(
                        proxy.__ray_call__.remote(lambda _: os.getpid()), timeout=30
                    )
                except Exception:  # a proxy being restarted: skip it this time
                    pass
        for deployment in deployments:
            for name, actor in self.replicas(deployment).items():
                try:
                    out[name.split("#", 1)[1]] = ray.get(actor.__ray_call__.remote(lambda _: os.getpid()), timeout=30)
                except Exception:  # a replica being replaced: skip it this time
                    pass
        return out

    def rss_mb(self, pids: dict[str, int]) -> dict[str, float]:
        return {name: mb for name, pid in pids.items() if (mb := rss_mb(pid)) is not None}

    def python_objects(self, deployments: tuple[str, ...] = ("Ingress", "VADHost")) -> dict[str, int]:
        """`Deployment#replica` -> objects the garbage collector tracks, after a full collection.
        Serve freezes what a replica built at startup (gc.freeze), so this counts what requests
        left. Unlike RSS (allocator high-water marks) it does not drift: a session that leaves
        anything behind adds objects (its connection, utterance stream, timeline, tasks, arrays, dicts)."""
        import ray

        def count(_replica) -> int:
            import gc

            gc.collect()
            return len(gc.get_objects())

        out = {}
        for deployment in deployments:
            for name, actor in self.replicas(deployment).items():
                try:
                    out[name.split("#", 1)[1]] = ray.get(actor.__ray_call__.remote(count), timeout=60)
                except Exception:  # a replica being replaced: skip it this time
                    pass
        return out

    def vad_live_sessions(self) -> int:
        import ray

        return sum(
            ray.get(a.record_routing_stats.remote(), timeout=30).get("live_sessions", 0)
            for a in self.replicas("VADHost").values()
        )

    def kill_when_busy(self, in_flight: dict[str, int], timeout_s: float = 10.0) -> list[dict]:
        """Kill one replica of each deployment in `in_flight`, back to back, at a moment when each
        has at least that many requests accepted and unanswered (or, if that moment does not come
        within `timeout_s`, anyway). Returns what was killed, with the requests it had in flight.

        Requests a replica has not accepted yet are re-routed by Serve itself; accepted ones fail
        to their caller, which must retry. A request may still finish between the count and the
        kill, so ask for more than one where the load allows."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            picked = {}
            for deployment, wanted in in_flight.items():
                for name, actor in self.replicas(deployment).items():
                    try:
                        n = ray.get(actor.get_num_ongoing_requests.remote(), timeout=5)
                    except Exception:  # being replaced
                        continue
                    if n >= wanted or time.monotonic() > deadline:
                        picked[deployment] = (name, actor, n)
                        break
            if len(picked) == len(in_flight):
                kills = []
                for deployment, (name, actor, n) in picked.items():
                    ray.kill(actor, no_restart=True)  # Serve starts a replacement
                    kills.append({"deployment": deployment, "replica": name, "in_flight": n, "t": time.time()})
                return kills
            time.sleep(0.005)

    def wait_replaced(self, deployment: str, killed: str, count: int, timeout_s: float = 180.0) -> float:
        """Seconds until Serve runs `count` replicas again, none of them `killed`."""
        from ray import serve

        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            live = self.replicas(deployment)
            states = serve.status().applications[self.app].deployments[deployment].replica_states
            if killed not in live and len(live) >= count and states.get("RUNNING", 0) >= count and len(states) == 1:
                return time.monotonic() - started
            time.sleep(0.2)
        raise TimeoutError(f"{deployment}: no replacement for {killed} in {timeout_s} s")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def health(url: str, admin_token: str | None = None) -> dict:
    """/healthz, with its details (stream tasks) when given the admin token."""
    http = url.replace("ws://", "http://").replace("wss://", "https://").rstrip("/")
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    return httpx.get(f"{http}/healthz", headers=headers, timeout=10).json()


def leftover_state(url: str, probe: Probe | None, admin_token: str | None = None) -> dict:
    body = health(url, admin_token)
    out = {
        "ingress_live_sessions": body.get("live_sessions_this_replica"),
        "ingress_stream_tasks": body.get("stream_tasks_this_replica"),
    }
    if probe is not None:
        out["vad_live_sessions"] = probe.vad_live_sessions()
    return out


async def wait_drained(url: str, probe: Probe | None, admin_token: str | None = None,
                       timeout_s: float = 30.0) -> tuple[dict, float]:  # fmt: skip
    """Leftover session state once it reaches zero (or at the timeout), and the seconds it took."""
    started = time.monotonic()
    while True:
        state = await asyncio.to_thread(leftover_state, url, probe, admin_token)
        if not any(state.values()) or time.monotonic() - started > timeout_s:
            return state, round(time.monotonic() - started, 1)
        await asyncio.sleep(0.5)


# ---- long sessions ---------------------------------------------------------------------------------
@dataclass
class SoakConfig:
    url: str = "ws://127.0.0.1:8000"
    clip: str = DEFAULT_CLIP
    audio_hours: float = 1.0  # per session
    sessions: int = 2
    speed: float | None = None  # x real time per session; None: as fast as the service answers
    ahead_s: float = 30.0  # a session streams at most this much audio beyond its last answered utterance
    warmup: float = 0.2  # fraction of the audio streamed before the `before` memory sample
    kill: tuple[str, ...] = ()  # deployments whose replicas are killed in turn during the long sessions
    kill_every_s: float = 60.0
    churn: int = 500
    churn_warmup: int = 9  # every protocol x ending once, before the `before` memory sample
    concurrency: int = 4
    auth_secret: str | None = None  # Xiaozhi device tokens
    admin_token: str | None = None  # /healthz's details: the Ingress's stream tasks
    seed: int = 1
    progress_s: float = 5.0
    out: str | None = None


@dataclass
class Samples:
    samples: list[dict] = field(default_factory=list)  # {"t", "audio_s", "answered", "rss_mb": {...}}


async def run_long_sessions(cfg: SoakConfig, reference: Reference, clip: np.ndarray, probe: Probe | None) -> dict:
    loop_s = len(clip) / 16000
    loops = max(1, round(cfg.audio_hours * 3600 / loop_s))
    logs = [SessionLog() for _ in range(cfg.sessions)]
    total_s = loops * loop_s * cfg.sessions
    pids = await asyncio.to_thread(probe.pids) if probe else {}
    objects_before = await asyncio.to_thread(probe.python_objects) if probe else {}
    timeline = Samples()
    kills: list[dict] = []
    before: dict[str, float] | None = None
    started = time.monotonic()

    def sample() -> dict:
        return {
            "t": round(time.monotonic() - started, 1),
            "audio_s": round(sum(log.audio_s for log in logs), 1),
            "answered": sum(len(log.results) for log in logs),
            "rss_mb": probe.rss_mb(pids) if probe else {},
        }

    async def watch(stop: asyncio.Event) -> None:
        nonlocal before
        next_kill = time.monotonic() + cfg.kill_every_s
        targets = list(cfg.kill)
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), cfg.progress_s)
            except TimeoutError:
                pass
            now = sample()
            timeline.samples.append(now)
            if before is None and now["audio_s"] >= cfg.warmup * total_s:
                before = now["rss_mb"]
            rate = now["audio_s"] / max(now["t"], 1e-6)
            rss = " ".join(f"{k.split('#')[0]}={v:.0f}" for k, v in sorted(now["rss_mb"].items()))
            print(f"[long {now['t']:7.1f}s] audio {now['audio_s'] / 3600:6.3f}/{total_s / 3600:.3f} h ({rate:5.1f}x "
                  f"real time)  answered {now['answered']:6d}  kills {len(kills)}  rss MB {rss}",
                  flush=True)  # fmt: skip
            if probe and targets and time.monotonic() >= next_kill and not stop.is_set():
                deployment = targets[len(kills) % len(targets)]
                count = len(await asyncio.to_thread(probe.replicas, deployment))
                (kill,) = await asyncio.to_thread(probe.kill_when_busy, {deployment: 2})
                print(f"[long] killed {kill['replica']} ({kill['in_flight']} requests in flight)", flush=True)
                kill["replaced_after_s"] = round(
                    await asyncio.to_thread(probe.wait_replaced, deployment, kill["replica"], count), 1
                )
                kills.append(kill)
                next_kill = time.monotonic() + cfg.kill_every_s

    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(stop))
    outcomes = await asyncio.gather(
        *(stream_session(cfg.url, clip, loops, log, speed=cfg.speed, ahead_s=cfg.ahead_s, device=i + 1,
                         auth_secret=cfg.auth_secret) for i, log in enumerate(logs)),  # fmt: skip
        return_exceptions=True,
    )
    end_rss = sample()["rss_mb"]
    stop.set()
    await watcher
    wall = time.monotonic() - started
    state_after, drained_s = await wait_drained(cfg.url, probe, cfg.admin_token)
    objects_after = await asyncio.to_thread(probe.python_objects) if probe else {}
    rss_before = before if before is not None else (timeline.samples[0]["rss_mb"] if timeline.samples else {})
    checks = [check_session(log, reference.expected(log.loops)) for log in logs]
    failures = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    totals = {k: sum(c[k] for c in checks) for k in ("expected", "answered", "lost", "duplicated", "wrong_text",
                                                      "errors", "unexpected", "retried")}  # fmt: skip
    return {
        "sessions": cfg.sessions,
        "audio_hours": round(total_s / 3600, 3),
        "audio_hours_per_session": round(loops * loop_s / 3600, 3),
        "wall_s": round(wall, 1),
        "x_real_time": round(total_s / wall, 1),
        **totals,
        "all_in_order": all(c["in_order"] for c in checks),
        "all_done": all(c["done"] for c in checks),
        "sessions_closed_early": [c["closed_early"] for c in checks if c["closed_early"]],
        "session_failures": failures,
        "kills": kills,
        "rss_mb_before": rss_before,
        "rss_mb_after": end_rss,
        "rss_mb_growth": growth(rss_before, end_rss),
        "state_after": state_after,
        "drained_after_s": drained_s,
        "python_objects_before": objects_before,
        "python_objects_after": objects_after,
        "python_objects_growth": growth(objects_before, objects_after),
        "timeline": timeline.samples,
    }


# ---- churn ----------------------------------------------------------------------------------------------
async def churn_cycle(
    url: str, n: int, protocol: str, kind: str, clip: np.ndarray, opus: list[bytes], reference: Reference,
    cut_ms: int, auth_secret: str | None,
) -> dict:  # fmt: skip
    """One connect / stream / disconnect. `goodbye` streams the clip and ends as the protocol does
    (its results are checked); `drop` and `close` stop after `cut_ms` of audio."""
    frames = _frames(protocol, clip, opus)
    if kind != "goodbye":
        frames = frames[: max(1, cut_ms // FRAME_MS)]
    finals: list[str] = []
    async with connect_device(url, protocol, n, auth_secret) as ws:
        await handshake(ws, protocol, n)
        for frame in frames:
            await ws.send(frame)
        if kind == "drop":
            ws.transport.abort()  # TCP gone, no close frame: a device losing power or network
            return {"kind": kind, "ok": True}
        if kind == "close":
            await ws.close()  # a close frame but no goodbye
            return {"kind": kind, "ok": True}
        want = len(reference.first)
        if protocol == "plain":
            await ws.send(json.dumps({"type": "end"}))
        elif protocol == "funasr":
            await ws.send(json.dumps({"is_speaking": False, "is_end": True}))
        else:  # a Xiaozhi device keeps sending silence until its answers are in, then hangs up
            silence = frame_audio(encode_pcm(np.zeros(FRAME_SAMPLES, dtype=np.int16), FRAME_MS)[0], 1)
            for _ in range(1000 // FRAME_MS):
                await ws.send(silence)
        async for raw in ws:
            msg = json.loads(raw)
            kind_of = msg.get("type") or msg.get("mode")
            if kind_of in ("result", "stt", "2pass-offline") and not msg.get("is_end"):
                finals.append(msg.get("text", ""))
            if kind_of == "done" or msg.get("is_end") or (protocol == "xiaozhi" and len(finals) == want):
                break
            if kind_of == "error" or "error" in msg:
                return {"kind": kind, "ok": False, "error": msg}
    # Opus is lossy: a Xiaozhi device's text differs from the PCM reference, so only its count is checked.
    texts_ok = protocol == "xiaozhi" or finals == [e.text for e in reference.first]
    return {"kind": kind, "ok": len(finals) == want and texts_ok, "answered": len(finals), "expected": want}


def _frames(protocol: str, clip: np.ndarray, opus: list[bytes]) -> list[bytes]:
    if protocol == "xiaozhi":
        return [frame_audio(p, 1) for p in opus]
    padded = np.concatenate([clip, np.zeros((-len(clip)) % FRAME_SAMPLES, dtype=np.int16)])
    return [padded[i : i + FRAME_SAMPLES].tobytes() for i in range(0, len(padded), FRAME_SAMPLES)]


async def run_churn(cfg: SoakConfig, reference: Reference, clip: np.ndarray, probe: Probe | None) -> dict:
    """`cfg.churn` cycles, after `cfg.churn_warmup` cycles that load each protocol's code paths
    (Opus, resamplers) before the `before` memory sample."""
    rng = random.Random(cfg.seed)
    opus = encode_pcm(clip, FRAME_MS)
    pids = await asyncio.to_thread(probe.pids) if probe else {}
    plan = [(n, PROTOCOLS[n % 3], CHURN_KINDS[(n // 3) % 3], rng.randint(300, len(clip) // 16 - 300))
            for n in range(cfg.churn_warmup + cfg.churn)]  # fmt: skip
    outcomes: list[dict] = []
    started = time.monotonic()

    async def cycles(items: list[tuple]) -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                n, protocol, kind, cut_ms = queue.get_nowait()
                try:
                    outcome = await churn_cycle(cfg.url, n, protocol, kind, clip, opus, reference, cut_ms,
                                                cfg.auth_secret)  # fmt: skip
                except Exception as exc:  # a connection that fails is what we count
                    outcome = {"kind": kind, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
                outcomes.append({"n": n, "protocol": protocol, **outcome})

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))

    async def progress(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), cfg.progress_s)
            except TimeoutError:
                pass
            state = await asyncio.to_thread(health, cfg.url)
            print(f"[churn {time.monotonic() - started:6.1f}s] cycles {len(outcomes):5d}/{len(plan)}  failed "
                  f"{sum(not o['ok'] for o in outcomes)}  ingress live sessions {state['live_sessions_this_replica']}"
                  f"  runner tasks {state.get('stream_tasks_this_replica')}", flush=True)  # fmt: skip

    stop = asyncio.Event()
    watcher = asyncio.create_task(progress(stop))
    await cycles(plan[: cfg.churn_warmup])
    before_state, _ = await wait_drained(cfg.url, probe, cfg.admin_token)
    rss_before = probe.rss_mb(pids) if probe else {}
    objects_before = await asyncio.to_thread(probe.python_objects) if probe else {}
    measured_from = time.monotonic()
    await cycles(plan[cfg.churn_warmup :])
    wall = time.monotonic() - measured_from
    stop.set()
    await watcher
    after_state, drained_s = await wait_drained(cfg.url, probe, cfg.admin_token)
    rss_after = probe.rss_mb(pids) if probe else {}
    objects_after = await asyncio.to_thread(probe.python_objects) if probe else {}
    measured = [o for o in outcomes if o["n"] >= cfg.churn_warmup]
    return {
        "cycles": len(measured),
        "warmup_cycles": len(outcomes) - len(measured),
        "by_kind": {k: sum(o["kind"] == k for o in measured) for k in CHURN_KINDS},
        "by_protocol": {p: sum(o["protocol"] == p for o in measured) for p in PROTOCOLS},
        "failed": [o for o in outcomes if not o["ok"]],
        "wall_s": round(wall, 1),
        "state_before": before_state,
        "state_after": after_state,
        "drained_after_s": drained_s,
        "rss_mb_before": rss_before,
        "rss_mb_after": rss_after,
        "rss_mb_growth": growth(rss_before, rss_after),
        "python_objects_before": objects_before,
        "python_objects_after": objects_after,
        "python_objects_growth": growth(objects_before, objects_after),
    }


# ---- the whole run ------------------------------------------------------------------------------------------
async def make_reference(url: str, clip: np.ndarray, auth_secret: str | None = None) -> Reference:
    log = await stream_session(url, clip, 2, SessionLog(), auth_secret=auth_secret)
    if log.errors or log.done is None:
        raise RuntimeError(f"the reference run failed: {log.errors or log.closed_early}")
    return reference_from(log.results, len(clip) // 16)


def growth(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Growth per process present in both samples."""
    return {k: round(after[k] - before[k], 1) for k in before if k in after}


async def vad_chunk_ms(url: str, auth_secret: str | None = None) -> int:
    """The service's VAD chunk, from a plain-protocol `ready`."""
    async with connect_device(url, "plain", 0, auth_secret) as ws:
        return int((await handshake(ws, "plain", 0))["vad_chunk_ms"])


async def run_soak(cfg: SoakConfig, probe: Probe | None) -> dict:
    clip = load_clip(cfg.clip, await vad_chunk_ms(cfg.url, cfg.auth_secret))
    reference = await make_reference(cfg.url, clip, cfg.auth_secret)
    print(f"reference: {len(reference.first)} utterances per {reference.loop_ms / 1000:g} s loop", flush=True)
    summary: dict = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("auth_secret", "admin_token")}}
    if cfg.audio_hours > 0:
        summary["long_sessions"] = await run_long_sessions(cfg, reference, clip, probe)
    if cfg.churn > 0:
        summary["churn"] = await run_churn(cfg, reference, clip, probe)
    summary["ok"] = soak_ok(summary)
    return summary


def soak_ok(summary: dict) -> bool:
    long, churn = summary.get("long_sessions"), summary.get("churn")
    ok = True
    if long:
        ok &= long["lost"] == 0 and long["duplicated"] == 0 and long["wrong_text"] == 0 and long["errors"] == 0
        ok &= long["all_in_order"] and long["all_done"] and not long["session_failures"]
        ok &= not any(long["state_after"].values())
    if churn:
        ok &= not churn["failed"] and not any(churn["state_after"].values())
    return bool(ok)


def parse_args(argv: list[str] | None = None) -> tuple[SoakConfig, str | None, str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=SoakConfig.url, help="service base URL (ws://host:port)")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="WAV looped by every session (speech and silence)")
    p.add_argument("--audio-hours", type=float, default=SoakConfig.audio_hours, help="audio per long session")
    p.add_argument("--sessions", type=int, default=SoakConfig.sessions, help="long sessions held at once")
    p.add_argument("--speed", type=float, default=None, help="cap per session, x real time (default: none)")
    p.add_argument("--ahead-s", type=float, default=SoakConfig.ahead_s, help="audio a session may stream beyond its "
                   "last answered utterance")  # fmt: skip
    p.add_argument("--warmup", type=float, default=SoakConfig.warmup, help="audio fraction before `before` RSS")
    p.add_argument("--kill", default="", help="deployments to kill replicas of, in turn: e.g. SenseVoice,Speaker")
    p.add_argument("--kill-every", type=float, default=SoakConfig.kill_every_s, help="seconds between kills")
    p.add_argument("--churn", type=int, default=SoakConfig.churn, help="connect/stream/disconnect cycles")
    p.add_argument("--concurrency", type=int, default=SoakConfig.concurrency, help="churn cycles at once")
    p.add_argument("--ray-address", default="auto", help="the service's Ray cluster ('none': no memory figures)")
    p.add_argument("--app", default="speech", help="Serve application name")
    p.add_argument("--auth-secret-env", default=DEFAULT_SECRET_ENV, help="env var with the device-token secret")
    p.add_argument("--admin-token-env", default=DEFAULT_ADMIN_TOKEN_ENV,
                   help="env var with the admin token (/healthz's stream-task count)")  # fmt: skip
    p.add_argument("--seed", type=int, default=SoakConfig.seed)
    p.add_argument("--progress-s", type=float, default=SoakConfig.progress_s)
    p.add_argument("--out", default=None, help="folder for summary.json (default loadtest/reports/soak-<time>)")
    a = p.parse_args(argv)
    cfg = SoakConfig(
        url=a.url, clip=a.clip, audio_hours=a.audio_hours, sessions=a.sessions, speed=a.speed, ahead_s=a.ahead_s,
        warmup=a.warmup,
        kill=tuple(k for k in a.kill.split(",") if k), kill_every_s=a.kill_every, churn=a.churn,
        concurrency=a.concurrency, auth_secret=os.environ.get(a.auth_secret_env),
        admin_token=os.environ.get(a.admin_token_env), seed=a.seed,
        progress_s=a.progress_s, out=a.out or f"loadtest/reports/soak-{time.strftime('%Y%m%d-%H%M%S')}",
    )  # fmt: skip
    return cfg, (None if a.ray_address == "none" else a.ray_address), a.app


def connect_probe(address: str | None, app: str) -> Probe | None:
    if address is None:
        return None
    # Ray 2.60 clusters want the node's token (~/.ray/auth_token); read when ray is imported.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except Exception as exc:
        print(f"no Ray driver ({type(exc).__name__}: {exc}); memory and VADHost figures left out", flush=True)
        return None
    return Probe(app)


def main(argv: list[str] | None = None) -> None:
    cfg, address, app = parse_args(argv)
    probe = connect_probe(address, app)
    print(f"soak: {cfg.sessions} sessions, {cfg.audio_hours:g} h of audio each, kills {list(cfg.kill) or 'none'}, "
          f"{cfg.churn} churn cycles, against {cfg.url}", flush=True)  # fmt: skip
    summary = asyncio.run(run_soak(cfg, probe))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(headline(summary), indent=1))
    print(f"summary: {out / 'summary.json'}; {'OK' if summary['ok'] else 'FAILED'}")
    raise SystemExit(0 if summary["ok"] else 1)


def headline(summary: dict) -> dict:
    """The figures without the timeline."""
    out = {"ok": summary["ok"]}
    if long := summary.get("long_sessions"):
        out["long_sessions"] = {k: v for k, v in long.items() if k != "timeline"}
    if churn := summary.get("churn"):
        out["churn"] = churn
    return out


if __name__ == "__main__":
    main()

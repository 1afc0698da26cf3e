"""A frame's path through the Ingress, as docs/architecture.md lists it, is the path the code takes.

One real connection per protocol (the real Ingress classes, over an in-memory WebSocket, with fake
VADHost and SenseVoice handles behind the real model calls) is traced with `sys.setprofile` from the
frame that ends an utterance until its result is sent. The test checks the documented steps against
the trace: every step's functions ran, in the order listed, and every file of ours that ran is a
step's (so the page cannot leave a file out). Calls into a file that a step's function makes itself
are not steps; a task a file starts for its own code is not a new entry. The lane router runs inside
Serve's handle, which the fake handle skips: it is the one listed file the trace cannot see.

For a Xiaozhi frame the page promises at most 9 files, none entered at more than two steps.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.protocols.funasr import FunasrConnection
from speech_serve.ingress.protocols.realtime import RealtimeConnection
from speech_serve.ingress.protocols.xiaozhi import XiaozhiConnection
from speech_serve.ingress.stream import Backlog, ModelCalls, UtteranceStreams
from speech_serve.messages import Transcript, VadEvent, VadFeedResult
from speech_serve.settings import AppSettings
from speech_serve.wire.opus import encode_pcm
from tests.support.fakes import MemoryWebSocket, binary, text

ROOT = Path(__file__).parents[3]
PACKAGE = ROOT / "speech_serve"
PAGE = ROOT / "docs" / "architecture.md"
UNTRACEABLE = {"replicas/lane_router.py"}  # runs in Serve's handle (see the docstring)
FRAME_MS = 60  # one frame, one VAD chunk: the traced frame is the one the VAD hears the end in


class EndOnCue:
    """A VADHost that hears speech start in the first chunk and end in the first chunk after `end`."""

    def __init__(self):
        self.end = False
        self.started = False

        async def remote(lane, items):
            out = []
            for item in items:
                events = []
                if item.chunk is not None and not self.started:
                    events, self.started = [VadEvent("start", item.chunk.start_ms)], True
                elif item.chunk is not None and self.end:
                    events = [VadEvent("end", item.chunk.start_ms)]
                out.append(VadFeedResult(events=events))
            return out

        self.feed_many = SimpleNamespace(remote=remote)


async def transcribe(request):
    return Transcript("turn on the light", "en", "neutral", "Speech", "<|en|>turn on the light")


def ours(path: str) -> str | None:
    """A file of the package, relative to it; None for anything else."""
    return str(Path(path).relative_to(PACKAGE)) if path.startswith(str(PACKAGE)) else None


def trace_frame(protocol: str) -> list[tuple[str | None, str, str]]:
    """(calling file, file, function qualname) of every call of ours, in order, from the frame that
    ends an utterance until the utterance's answer is sent. The calling file is that of the nearest
    function of ours on the stack: None where the event loop called (a task starting, a callback).
    A resumed coroutine is not a call."""
    settings = AppSettings(stream={"vad_chunk_ms": FRAME_MS, "vad_batch_interval_ms": 0},
                           speaker={"enabled": False}, realtime={"interim_interval_ms": None})  # fmt: skip
    vad = EndOnCue()
    calls: list[tuple[str | None, str, str]] = []

    async def scenario():
        metrics = IngressMetrics()
        backlog = Backlog(settings.admission)
        asr = SimpleNamespace(transcribe=SimpleNamespace(remote=transcribe))
        streams = UtteranceStreams(ModelCalls(vad, asr, None, settings, backlog), settings, metrics, "test")
        ws = MemoryWebSocket(headers={"device-id": "d1", "protocol-version": "1"})
        pcm = np.full(16 * FRAME_MS * 20, 300, dtype=np.int16)
        if protocol == "xiaozhi":
            conn = XiaozhiConnection(ws, "s1", streams, settings.limits, metrics, settings.xiaozhi)
            hello = {"type": "hello", "audio_params": {"format": "opus", "sample_rate": 16000, "channels": 1,
                                                       "frame_duration": FRAME_MS}}  # fmt: skip
            first = [text(hello)]
            frames = [binary(p) for p in encode_pcm(pcm, FRAME_MS)]
            answered = lambda m: m.get("type") == "stt"  # noqa: E731
        elif protocol == "funasr":
            conn = FunasrConnection(ws, "s1", streams, settings.limits, metrics, settings.funasr)
            first = [text({"mode": "offline", "wav_name": "w", "audio_fs": 16000})]
            frames = [binary(pcm[i : i + 16 * FRAME_MS].tobytes()) for i in range(0, len(pcm), 16 * FRAME_MS)]
            answered = lambda m: m.get("mode") == "offline" and m.get("text")  # noqa: E731
        else:
            conn = RealtimeConnection(ws, "s1", streams, settings.limits, metrics, settings.realtime, 600)
            first = [text({"type": "session.update", "session": {"type": "transcription", "audio": {
                "input": {"format": {"type": "audio/pcm", "rate": 16000}}}}})]  # fmt: skip
            import base64

            frames = [text({"type": "input_audio_buffer.append",
                            "audio": base64.b64encode(pcm[i : i + 16 * FRAME_MS].tobytes()).decode()})
                      for i in range(0, len(pcm), 16 * FRAME_MS)]  # fmt: skip
            answered = lambda m: m.get("type", "").endswith("transcription.completed")  # noqa: E731
        session = asyncio.create_task(conn.run())
        for frame in first + frames[:-1]:
            ws.inbox.put_nowait(frame)
        for _ in range(1000):  # everything before the traced frame handled (a hang guard, not a speed bound)
            await asyncio.sleep(0.01)
            if conn.stream is not None and conn.queued.count == 0 and conn.stream.timeline.vad_ms >= 18 * FRAME_MS:
                break
        vad.end = True
        seen: set = set()

        def profile(frame, event, arg):
            if event != "call" or frame in seen:
                return
            seen.add(frame)
            where = ours(frame.f_code.co_filename)
            if where is None:
                return
            caller = frame.f_back
            while caller is not None and ours(caller.f_code.co_filename) is None:
                caller = caller.f_back
            calls.append((ours(caller.f_code.co_filename) if caller else None, where, frame.f_code.co_qualname))

        sys.setprofile(profile)
        try:
            ws.inbox.put_nowait(frames[-1])
            for _ in range(1000):
                if any(answered(m) for m in ws.sent):
                    break
                await asyncio.sleep(0.005)
        finally:
            sys.setprofile(None)
        assert any(answered(m) for m in ws.sent), ws.sent
        ws.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(session, 10)

    asyncio.run(scenario())
    return calls


def steps_of(calls: list[tuple[str | None, str, str]]) -> list[tuple[str, list[str]]]:
    """The path: where the frame starts, then each entry into a file, a call from a function of one
    file to a function of another. Consecutive calls from one file into one other (a function
    consulting a helper twice) are one entry; the event loop's calls are none (a task a file starts
    for its own code continues that file's step)."""
    steps: list[tuple[str, list[str], str | None]] = [(calls[0][1], [calls[0][2]], None)]
    for caller, file, function in calls[1:]:
        entry = caller is not None and caller != file
        if not entry or (steps[-1][0] == file and steps[-1][2] == caller):
            if steps[-1][0] == file:  # a function of the step's file, run within the step
                steps[-1][1].append(function)
            continue
        steps.append((file, [function], caller))
    return [(file, functions) for file, functions, _ in steps]


STEP = re.compile(r"^\d+\. `(?P<file>[\w/.]+\.py)` (?P<functions>(`[\w.]+`(, )?)+)")


def documented(protocol: str) -> list[tuple[str, list[str]]]:
    """The numbered steps between the page's `<!-- path: protocol -->` markers: (file, functions)."""
    section = PAGE.read_text().split(f"<!-- path: {protocol} -->")[1].split("<!-- /path -->")[0]
    steps = []
    for line in section.splitlines():
        if m := STEP.match(line.strip()):
            steps.append((m["file"], re.findall(r"`([\w.]+)`", m["functions"])))
    return steps


def named(function: str, qualnames: list[str]) -> bool:
    """`function` names one of them: its qualname, its last part, or its class."""
    return any(q == function or q.endswith("." + function) or q.startswith(function + ".") for q in qualnames)


@pytest.mark.parametrize("protocol", ["xiaozhi", "funasr", "realtime"])
def test_the_documented_path_is_the_path_the_frame_takes(protocol):
    traced = [step for step in steps_of(trace_frame(protocol)) if step[0] not in UNTRACEABLE]
    listed = [step for step in documented(protocol) if step[0] not in UNTRACEABLE]
    assert [file for file, _ in listed] == [file for file, _ in traced], f"{protocol}: {traced}"
    for (file, functions), (_, ran) in zip(listed, traced, strict=True):
        assert all(named(f, ran) for f in functions), f"{protocol}: {file} {functions} not in {ran}"


def test_a_xiaozhi_frame_visits_at_most_9_files_none_entered_more_than_twice():
    calls = trace_frame("xiaozhi")
    files = {file for _, file, _ in calls} | UNTRACEABLE
    entered = [file for file, _ in steps_of(calls)[1:]]
    assert len(files) <= 9, sorted(files)
    assert max(entered.count(f) for f in entered) <= 2, entered
    assert {file for file, _ in documented("xiaozhi")} == files  # the page names every file the frame visits


def test_the_trace_sees_every_call_of_ours():
    """The tracer itself: a control, so that a path it could not see would not pass for a short one."""
    steps = steps_of(trace_frame("xiaozhi"))
    assert steps[0][0] == "ingress/connection.py" and steps[0][1][0] == "Connection._read_frames"
    decoding = next(functions for file, functions in steps if file == "ingress/protocols/xiaozhi.py")
    assert {"XiaozhiConnection.on_frame", "parse_binary", "OpusDecoder.decode"} <= set(decoding)
    assert json.dumps(steps)  # plain data, printable in a failure

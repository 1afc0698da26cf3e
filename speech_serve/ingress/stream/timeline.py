"""The timeline of one utterance stream, pure (no I/O, no Ray, no clock): the audio since the last
finished utterance, the VAD chunks to send, the utterances cut from the VAD's events (or by the
client, push-to-talk), and the speech edges a protocol may report. All times are milliseconds from
the start of the stream's audio."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from speech_serve.messages import Utterance, VadChunk, VadEvent
from speech_serve.wire.pcm import SAMPLES_PER_MS

_EMPTY = np.zeros(0, dtype=np.int16)


@dataclass(frozen=True)
class SpeechEdge:
    """Where speech began or an utterance was cut, as the timeline decided it (Realtime's
    speech_started / speech_stopped / committed).

    started: the VAD heard speech begin at `ms` (again at a forced cut, where speech goes on).
    stopped: the utterance was cut at `ms` while the VAD heard it: its end of speech, or a forced
             cut at max_utterance_ms.
    cut:     the client ended the utterance (push-to-talk released, a commit), or push-to-talk ran
             past max_utterance_ms.
    `index`: the utterance's number (its result's `index`); None when it was too short to
    recognise and was dropped (no result follows). `start_ms`: where the cut piece began."""

    kind: Literal["started", "stopped", "cut"]
    ms: int
    index: int | None = None
    start_ms: int | None = None


class AudioBuffer:
    """int16 samples appended at the end and dropped from the front, each in time linear in the
    samples moved (a client's tiny frames must not copy the whole utterance each). Samples once
    stored are never overwritten: a full array is replaced by a new one, so the views handed out
    (VAD chunks waiting for their lane's call) keep their audio."""

    def __init__(self) -> None:
        self._data = _EMPTY
        self._start = self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def append(self, pcm: np.ndarray) -> None:
        n = len(pcm)
        if self._end + n > len(self._data):  # grow (or compact) into a new array: amortised O(1) a sample
            live = len(self)
            grown = np.empty(2 * (live + n), dtype=np.int16)
            grown[:live] = self._data[self._start : self._end]
            self._data, self._start, self._end = grown, 0, live
        self._data[self._end : self._end + n] = pcm
        self._end += n

    def view(self) -> np.ndarray:
        """The samples held, as a view: slice it; copy what must outlive later appends' growth."""
        return self._data[self._start : self._end]

    def drop(self, n: int) -> None:
        """Forget the first `n` samples."""
        self._start += min(max(n, 0), len(self))


class Timeline:
    """The audio of one utterance stream since its last finished utterance, and where the
    utterance being spoken started: a pure state machine (no I/O, no Ray).

    Audio goes in with `add_audio`, which returns the chunks to send to the VAD (at least
    `vad_chunk_ms` each, to keep the number of Serve calls low). The VAD's events go back in with
    `on_vad_events`, which returns the finished utterances sliced from the buffer. Push-to-talk
    (`manual`) skips the VAD: `begin_manual` / `end_manual` cut the utterance.

    An utterance shorter than `min_utterance_ms` (never less than 1 ms) is dropped, not numbered:
    a VAD end at or before a force-cut leaves 0 samples, and the models' fbank raises on a clip of
    a few ms, failing its whole batch. No interim goes out for so little audio either.
    """

    def __init__(self, vad_chunk_ms: int, max_utterance_ms: int, idle_keep_ms: int = 1000, min_utterance_ms: int = 0):
        self._chunk_samples = vad_chunk_ms * SAMPLES_PER_MS
        self._max_utterance_ms = max_utterance_ms
        self._min_utterance_ms = max(min_utterance_ms, 1)
        self.dropped = 0  # utterances too short to recognise
        # While nobody speaks, keep this much audio before the VAD's position: the VAD
        # reports a start a few hundred ms after it happened (lookback + confirmation).
        self._idle_keep_ms = idle_keep_ms + vad_chunk_ms
        self._buffer = AudioBuffer()  # audio from _buffer_start_ms up to received_ms
        self._buffer_start_ms = 0
        self._pending = AudioBuffer()  # received, not yet sent to the VAD
        self.sent_ms = 0  # stream position up to which audio has gone out in VAD chunks
        # Position up to which the VAD's events have been applied. Behind sent_ms while the chunks
        # of one large frame are fed one by one: trimming, force-cuts and replays count from here.
        self.vad_ms = 0
        self.speech_start_ms: int | None = None
        self.utterances_done = 0
        self.finished = False
        self._restart_vad = False  # the next chunk starts a fresh VAD state (after abort / push-to-talk)
        self.manual = False  # push-to-talk: the client, not the VAD, says where utterances end
        self.end_silence_ms: int | None = None  # this stream's end silence for the VAD; None: the replica's
        self.edges: list[SpeechEdge] = []  # since the stream last took them (take_edges)
        self._speaking = False  # a `started` edge is out and its utterance not cut yet (a replay re-reports it)

    @property
    def received_ms(self) -> int:
        return self._buffer_start_ms + len(self._buffer) // SAMPLES_PER_MS

    @property
    def buffered_ms(self) -> int:
        return len(self._buffer) // SAMPLES_PER_MS

    def add_audio(self, pcm: np.ndarray) -> list[VadChunk]:
        """Take client audio; return the VAD chunks that are now full."""
        if self.finished:
            raise RuntimeError("session already finished")
        self._buffer.append(pcm)
        self._pending.append(pcm)
        chunks = []
        while len(self._pending) >= self._chunk_samples:
            chunks.append(self._take_chunk(self._chunk_samples, final=False))
        return chunks

    def flush(self) -> VadChunk:
        """End of stream: the rest of the audio, marked final so the VAD closes open speech."""
        self.finished = True
        return self._take_chunk(len(self._pending), final=True)

    def _take_chunk(self, n: int, final: bool) -> VadChunk:
        chunk = VadChunk(pcm=self._pending.view()[:n], start_ms=self.sent_ms, final=final, restart=self._restart_vad,
                         end_silence_ms=self.end_silence_ms)  # fmt: skip
        self._restart_vad = False
        self._pending.drop(n)
        self.sent_ms += n // SAMPLES_PER_MS
        return chunk

    def replay_chunk(self, failed: VadChunk | None = None) -> VadChunk:
        """The audio since the last finished utterance up to the end of `failed` (the chunk whose
        call found the VAD state gone; default: all that was sent), for a fresh VAD state.

        The new replica rebuilds its state from this and reports the unfinished utterance's start
        again. It stops at `failed`: the chunks after it are still to be fed, each once.
        """
        self.speech_start_ms = None
        end_ms = self.sent_ms if failed is None else failed.start_ms + len(failed.pcm) // SAMPLES_PER_MS
        final = self.finished if failed is None else failed.final
        n = (end_ms - self._buffer_start_ms) * SAMPLES_PER_MS
        return VadChunk(pcm=self._buffer.view()[:n], start_ms=self._buffer_start_ms, final=final, restart=True,
                        end_silence_ms=self.end_silence_ms)  # fmt: skip

    def speech_so_far(self) -> tuple[int, np.ndarray] | None:
        """The unfinished utterance (its index and audio up to what the VAD has seen), for interim text."""
        if self.speech_start_ms is None or self.vad_ms - self.speech_start_ms < self._min_utterance_ms:
            return None
        a = (self.speech_start_ms - self._buffer_start_ms) * SAMPLES_PER_MS
        b = (self.vad_ms - self._buffer_start_ms) * SAMPLES_PER_MS
        return self.utterances_done, self._buffer.view()[a:b].copy()

    def begin_manual(self) -> None:
        """Push-to-talk: the utterance starts now, whatever the VAD would say."""
        self.manual = True
        self._skip_pending()
        self._trim(self.received_ms)
        self.speech_start_ms = self.received_ms
        self._speaking = False

    def end_manual(self) -> Utterance | None:
        """Push-to-talk released: everything since `begin_manual` is the utterance."""
        start = self.speech_start_ms if self.speech_start_ms is not None else self._buffer_start_ms
        self._skip_pending()
        self.speech_start_ms = None
        self._speaking = False
        if self.received_ms <= start:
            return None
        utterance = self._cut(start, self.received_ms, forced=False)
        self._edge("cut", self.received_ms, utterance, start)
        return utterance

    def abort(self) -> None:
        """Drop the utterance being spoken and every buffered sample; the VAD starts afresh."""
        self._skip_pending()
        self.speech_start_ms = None
        self._speaking = False
        self._trim(self.received_ms)

    def take_edges(self) -> list[SpeechEdge]:
        """The speech edges since the last call, in order."""
        edges, self.edges = self.edges, []
        return edges

    def _edge(
        self, kind: Literal["started", "stopped", "cut"], ms: int, utterance: Utterance | None = None,
        start_ms: int | None = None,
    ) -> None:  # fmt: skip
        self.edges.append(SpeechEdge(kind, ms, None if utterance is None else utterance.index, start_ms))

    def _skip_pending(self) -> None:
        """Audio not yet sent to the VAD will not be; the VAD state restarts at the next chunk."""
        self._pending = AudioBuffer()
        self.sent_ms = self.vad_ms = self.received_ms
        self._restart_vad = True

    def on_vad_events(self, events: list[VadEvent], upto_ms: int | None = None) -> list[Utterance]:
        """Apply the VAD's events for the audio up to `upto_ms` (the end of the chunk they answer;
        default: all that was sent); return finished utterances in order."""
        self.vad_ms = self.sent_ms if upto_ms is None else min(max(upto_ms, self.vad_ms), self.sent_ms)
        done: list[Utterance] = []
        for event in events:
            if event.kind == "start":
                if self.speech_start_ms is None:
                    self.speech_start_ms = max(event.ms, self._buffer_start_ms)
                    self._started(self.speech_start_ms)
            else:
                start = self.speech_start_ms if self.speech_start_ms is not None else self._buffer_start_ms
                end = max(min(event.ms, self.received_ms), start)
                self._started(start)
                done.append(self._cut(start, end, forced=False))
                self._edge("stopped", end, done[-1], start)
                self._speaking = False
                self.speech_start_ms = None
        if self.speech_start_ms is not None and self.vad_ms - self.speech_start_ms >= self._max_utterance_ms:
            cut_at, start = self.vad_ms, self.speech_start_ms
            done.append(self._cut(start, cut_at, forced=True))
            self.speech_start_ms = cut_at  # the speech goes on; the VAD's end closes the next piece
            if self.manual:
                self._edge("cut", cut_at, done[-1], start)
            else:
                self._edge("stopped", cut_at, done[-1], start)
                self._edge("started", cut_at)
        if self.speech_start_ms is None:
            self._trim(self.vad_ms - self._idle_keep_ms)
        return [u for u in done if u is not None]

    def _started(self, ms: int) -> None:
        """Speech began at `ms`: one `started` edge per utterance, however often the VAD says so
        (a replay on a new VAD replica reports the start of the unfinished utterance again)."""
        if not self._speaking and not self.manual:
            self._edge("started", ms)
            self._speaking = True

    def _cut(self, start_ms: int, end_ms: int, forced: bool) -> Utterance | None:
        """The utterance from start to end, or None (dropped) if it is too short to recognise."""
        if end_ms - start_ms < self._min_utterance_ms:
            self.dropped += 1
            self._trim(end_ms)
            return None
        a = (start_ms - self._buffer_start_ms) * SAMPLES_PER_MS
        b = (end_ms - self._buffer_start_ms) * SAMPLES_PER_MS
        utterance = Utterance(self.utterances_done, start_ms, end_ms, self._buffer.view()[a:b].copy(), forced)
        self.utterances_done += 1
        self._trim(end_ms)
        return utterance

    def _trim(self, keep_from_ms: int) -> None:
        drop = (keep_from_ms - self._buffer_start_ms) * SAMPLES_PER_MS
        if drop > 0:
            self._buffer.drop(drop)
            self._buffer_start_ms += drop // SAMPLES_PER_MS


def utterances_of(pcm: np.ndarray, segments: list[tuple[int, int]], min_utterance_ms: int = 0) -> list[Utterance]:
    """A whole recording's utterances, from the VAD's (start_ms, end_ms) segments (empty ones, and
    those shorter than `min_utterance_ms`, skipped)."""
    shortest = max(min_utterance_ms, 1)
    return [
        Utterance(i, a, b, pcm[a * SAMPLES_PER_MS : b * SAMPLES_PER_MS])
        for i, (a, b) in enumerate(segments)
        if b - a >= shortest
    ]

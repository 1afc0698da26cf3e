"""The per-connection session: a pure state machine over audio and VAD events.

It owns the audio since the last finished utterance. Audio goes in with `add_audio`,
which returns the chunks to send to the VAD (at least `vad_chunk_ms` each, to keep the
number of Serve calls low). The VAD's events go back in with `on_vad_events`, which
returns the finished utterances sliced from the buffer. No I/O, no Ray: the ingress
drives it, and unit tests drive it directly.

All times are milliseconds from the start of the session's audio stream.
"""

from __future__ import annotations

import numpy as np

from serve_app.audio import ms_to_samples, samples_to_ms
from serve_app.messages import Utterance, VadChunk, VadEvent

_EMPTY = np.zeros(0, dtype=np.int16)


class Session:
    def __init__(self, session_id: str, vad_chunk_ms: int, max_utterance_ms: int, idle_keep_ms: int = 1000):
        self.session_id = session_id
        self._chunk_samples = ms_to_samples(vad_chunk_ms)
        self._max_utterance_ms = max_utterance_ms
        # While nobody speaks, keep this much audio before the VAD's position: the VAD
        # reports a start a few hundred ms after it happened (lookback + confirmation).
        self._idle_keep_ms = idle_keep_ms + vad_chunk_ms
        self._buffer = _EMPTY  # audio from _buffer_start_ms up to received_ms
        self._buffer_start_ms = 0
        self._pending = _EMPTY  # received, not yet sent to the VAD
        self.sent_ms = 0  # stream position up to which the VAD has audio
        self.speech_start_ms: int | None = None
        self.utterances_done = 0
        self.finished = False
        self._restart_vad = False  # the next chunk starts a fresh VAD state (after abort / push-to-talk)

    @property
    def received_ms(self) -> int:
        return self._buffer_start_ms + samples_to_ms(len(self._buffer))

    @property
    def buffered_ms(self) -> int:
        return samples_to_ms(len(self._buffer))

    def add_audio(self, pcm: np.ndarray) -> list[VadChunk]:
        """Take client audio; return the VAD chunks that are now full."""
        if self.finished:
            raise RuntimeError("session already finished")
        self._buffer = np.concatenate([self._buffer, pcm])
        self._pending = np.concatenate([self._pending, pcm])
        chunks = []
        while len(self._pending) >= self._chunk_samples:
            chunks.append(self._take_chunk(self._chunk_samples, final=False))
        return chunks

    def flush(self) -> VadChunk:
        """End of stream: the rest of the audio, marked final so the VAD closes open speech."""
        self.finished = True
        return self._take_chunk(len(self._pending), final=True)

    def _take_chunk(self, n: int, final: bool) -> VadChunk:
        chunk = VadChunk(pcm=self._pending[:n], start_ms=self.sent_ms, final=final, restart=self._restart_vad)
        self._restart_vad = False
        self._pending = self._pending[n:]
        self.sent_ms += samples_to_ms(n)
        return chunk

    def replay_chunk(self) -> VadChunk:
        """All audio the VAD has seen since the last finished utterance, for a fresh VAD state.

        Used when the session's VAD replica is gone: the new replica rebuilds its state
        from this and reports the unfinished utterance's start again.
        """
        self.speech_start_ms = None
        n = ms_to_samples(self.sent_ms - self._buffer_start_ms)
        return VadChunk(pcm=self._buffer[:n], start_ms=self._buffer_start_ms, final=self.finished, restart=True)

    def speech_so_far(self) -> tuple[int, np.ndarray] | None:
        """The unfinished utterance (its index and audio up to what the VAD has seen), for interim text."""
        if self.speech_start_ms is None:
            return None
        a = ms_to_samples(self.speech_start_ms - self._buffer_start_ms)
        b = ms_to_samples(self.sent_ms - self._buffer_start_ms)
        return self.utterances_done, self._buffer[a:b].copy()

    def begin_manual(self) -> None:
        """Push-to-talk: the utterance starts now, whatever the VAD would say."""
        self._skip_pending()
        self._trim(self.received_ms)
        self.speech_start_ms = self.received_ms

    def end_manual(self) -> Utterance | None:
        """Push-to-talk released: everything since `begin_manual` is the utterance."""
        start = self.speech_start_ms if self.speech_start_ms is not None else self._buffer_start_ms
        self._skip_pending()
        self.speech_start_ms = None
        if self.received_ms <= start:
            return None
        return self._cut(start, self.received_ms, forced=False)

    def abort(self) -> None:
        """Drop the utterance being spoken and every buffered sample; the VAD starts afresh."""
        self._skip_pending()
        self.speech_start_ms = None
        self._trim(self.received_ms)

    def _skip_pending(self) -> None:
        """Audio not yet sent to the VAD will not be; the VAD state restarts at the next chunk."""
        self._pending = _EMPTY
        self.sent_ms = self.received_ms
        self._restart_vad = True

    def on_vad_events(self, events: list[VadEvent]) -> list[Utterance]:
        """Apply VAD events; return finished utterances in order."""
        done: list[Utterance] = []
        for event in events:
            if event.kind == "start":
                if self.speech_start_ms is None:
                    self.speech_start_ms = max(event.ms, self._buffer_start_ms)
            else:
                start = self.speech_start_ms if self.speech_start_ms is not None else self._buffer_start_ms
                end = max(min(event.ms, self.received_ms), start)
                done.append(self._cut(start, end, forced=False))
                self.speech_start_ms = None
        if self.speech_start_ms is not None and self.sent_ms - self.speech_start_ms >= self._max_utterance_ms:
            cut_at = self.sent_ms
            done.append(self._cut(self.speech_start_ms, cut_at, forced=True))
            self.speech_start_ms = cut_at  # the speech goes on; the VAD's end closes the next piece
        if self.speech_start_ms is None:
            self._trim(self.sent_ms - self._idle_keep_ms)
        return done

    def _cut(self, start_ms: int, end_ms: int, forced: bool) -> Utterance:
        a = ms_to_samples(start_ms - self._buffer_start_ms)
        b = ms_to_samples(end_ms - self._buffer_start_ms)
        utterance = Utterance(self.utterances_done, start_ms, end_ms, self._buffer[a:b].copy(), forced)
        self.utterances_done += 1
        self._trim(end_ms)
        return utterance

    def _trim(self, keep_from_ms: int) -> None:
        drop = ms_to_samples(keep_from_ms - self._buffer_start_ms)
        if drop > 0:
            self._buffer = self._buffer[drop:]
            self._buffer_start_ms += samples_to_ms(drop)

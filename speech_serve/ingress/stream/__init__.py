"""The utterance stream of a session: audio in, one result per utterance out, in order.

timeline.py  the pure timeline: audio since the last utterance, VAD chunks, utterances and speech edges
calls.py     every call to a replica (VAD lanes with replay, SenseVoice, Speaker) and SenseVoice's backlog
stream.py    `UtteranceStream`: pushes audio, feeds the VAD, recognises utterances, answers in order
"""

from speech_serve.ingress.stream.calls import Backlog, ModelCalls, VadLanes
from speech_serve.ingress.stream.stream import (
    Recognition,
    RecognitionOptions,
    UtteranceStream,
    UtteranceStreams,
    live_stream_tasks,
)
from speech_serve.ingress.stream.timeline import SpeechEdge, Timeline, utterances_of

__all__ = [
    "Backlog", "ModelCalls", "Recognition", "RecognitionOptions", "SpeechEdge", "Timeline", "UtteranceStream",
    "UtteranceStreams", "VadLanes", "live_stream_tasks", "utterances_of",
]  # fmt: skip

"""What crosses processes (messages.py): a speaker's wire fields say only what is known, and only a
usable embedding is compared."""

import numpy as np

from speech_serve.messages import SpeakerInfo, usable_embedding


def test_a_speakers_wire_fields_carry_the_reason_and_the_embedding_only_when_there_are_some():
    matched = SpeakerInfo("alice", 0.91, "spk1", "s1:0")
    assert matched.fields() == {"label": "alice", "score": 0.91, "speaker_id": "spk1", "embedding_id": "s1:0"}
    shed = SpeakerInfo(reason="shed")
    assert shed.fields() == {"label": "unknown", "score": None, "speaker_id": None, "embedding_id": None,
                             "reason": "shed"}  # fmt: skip
    asked = SpeakerInfo("bob", 0.8, "spk2", "s1:1", embedding=[0.1, 0.2])
    assert asked.fields()["embedding"] == [0.1, 0.2] and "reason" not in asked.fields()


def test_only_a_finite_nonzero_vector_is_a_usable_embedding():
    assert usable_embedding(np.ones(192, np.float32))
    assert not usable_embedding(np.zeros(192, np.float32))  # statistics pooling over a frame or two
    assert not usable_embedding(np.full(192, np.nan, np.float32))
    assert not usable_embedding(np.array([], np.float32))

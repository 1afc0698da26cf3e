"""The Speaker (replicas/speaker.py): batched embeddings, test models' voiceprint names, and
matching against the enrolled voiceprints."""


import numpy as np

from speech_serve.replicas.speaker import Identifier, SpeakerCore, best_match, tile_to
from speech_serve.settings import SpeakerSettings
from speech_serve.voiceprints import Candidate
from tests.support.fakes import vec


def test_speaker_batched_embedding_matches_single(tiny_models, two_utterances):
    spk = SpeakerCore(tiny_models.speaker, SpeakerSettings(threads=1))
    short, long = two_utterances[8000:30000], two_utterances[68800:112000]
    batched = spk.embed_batch([short, long])
    alone = spk.embed_batch([short])
    assert batched[0].vector.shape == (192,) and batched[0].batch_size == 2
    cos = float(
        np.dot(batched[0].vector, alone[0].vector) / np.linalg.norm(batched[0].vector) / np.linalg.norm(alone[0].vector)
    )
    assert cos > 0.99


def test_voiceprints_of_a_random_weight_model_are_never_filed_under_the_real_models_name(tiny_models):
    """A test model's embeddings are noise: stored as `eres2netv2` they would be matched against the
    real model's once it is installed."""
    from speech_serve.replicas.models import ModelSource
    from speech_serve.replicas.speaker import voiceprint_model_name

    spk = SpeakerCore(tiny_models.speaker, SpeakerSettings(threads=1))
    assert tiny_models.speaker.is_test
    assert spk.model_name != "eres2netv2" and "test" in spk.model_name
    assert voiceprint_model_name(ModelSource("speaker", "hub", "iic/speech_campplus_sv_zh-cn_16k-common")) == "campplus"
    assert voiceprint_model_name(ModelSource("speaker", "local", "/m/eres2netv2")) == "eres2netv2"
    assert voiceprint_model_name(ModelSource("speaker", "bundled", "resemblyzer", backend="ge2e")) == "ge2e"


def test_tile_to_repeats_the_clip():
    assert tile_to(np.array([1, 2, 3], dtype=np.int16), 7).tolist() == [1, 2, 3, 1, 2, 3, 1]


def test_best_match_needs_the_threshold():
    cands = [Candidate("a", "alice", vec(1, 0)), Candidate("b", "bob", vec(0, 1))]
    assert best_match(vec(0.95, 0.1), cands, 0.8).label == "alice"
    low = best_match(vec(1, 1), cands, 0.8)
    # no score for `unknown`: it would tell a client how close it came to someone else's voiceprint
    assert (low.label, low.score, low.speaker_id) == ("unknown", None, None)
    assert best_match(vec(1, 0), [], 0.8).label == "unknown"


def test_the_identifiers_cache_keeps_the_most_recent_groups_only(store):
    """One cache entry per group ever matched, never dropped: with a group per device, a replica's
    memory grew with every device it ever heard."""
    store.create("alice", "home", "ge2e", [vec(1, 0)])
    ident = Identifier(store, "ge2e", threshold=0.8, refresh_s=3600, max_groups=2)
    for n in range(100):
        ident.identify(vec(1, 0), f"device:{n}")
        assert ident.identify(vec(1, 0), "home").label == "alice"  # the household stays in use, and cached
    assert list(ident._cache) == ["device:99", "home"]


def test_identifier_sees_new_enrolments_after_refresh(store):
    ident = Identifier(store, "ge2e", threshold=0.8, refresh_s=0.0)
    assert ident.identify(vec(1, 0), "home").label == "unknown"
    store.create("alice", "home", "ge2e", [vec(1, 0)])
    assert ident.identify(vec(1, 0), "home").label == "alice"
    cached = Identifier(store, "ge2e", threshold=0.8, refresh_s=3600)
    assert cached.identify(vec(0, 1), "home").label == "unknown"
    store.create("bob", "home", "ge2e", [vec(0, 1)])
    assert cached.identify(vec(0, 1), "home").label == "unknown"  # not refreshed yet: cache holds

"""The plain model classes behind the deployments, without Serve: real fsmn-vad weights,
tiny random SenseVoice and ERes2NetV2 built locally."""

import numpy as np
import pytest

from speech_serve.messages import AsrRequest
from speech_serve.replicas.asr import AsrCore
from speech_serve.replicas.speaker import SpeakerCore, tile_to
from speech_serve.replicas.vad import VadCore
from speech_serve.settings import AsrSettings, SpeakerSettings, VadSettings
from tests.conftest import TWO_UTTERANCES_SPEECH_MS


@pytest.fixture(scope="module")
def vad(tiny_models):
    return VadCore(tiny_models.vad, VadSettings(max_end_silence_ms=600))


def stream(vad, session_id, pcm, chunk_ms=200):
    events, step = [], chunk_ms * 16
    for i in range(0, len(pcm), step):
        final = i + step >= len(pcm)
        result = vad.feed(session_id, pcm[i : i + step], i // 16, final=final)
        assert not result.state_lost
        events += result.events
    return events


def pairs(events):
    starts = [e.ms for e in events if e.kind == "start"]
    ends = [e.ms for e in events if e.kind == "end"]
    return list(zip(starts, ends, strict=True))


def test_vad_finds_both_utterances(vad, two_utterances):
    found = pairs(stream(vad, "a", two_utterances))
    assert len(found) == 2
    for (start, end), (true_start, true_end) in zip(found, TWO_UTTERANCES_SPEECH_MS, strict=True):
        assert abs(start - true_start) < 400 and abs(end - true_end) < 400
    assert vad.live_sessions == 0  # the final chunk ends the stream


def test_vad_sessions_interleave_without_mixing(vad, two_utterances):
    step = 200 * 16
    events = {"x": [], "y": []}
    for i in range(0, len(two_utterances), step):
        final = i + step >= len(two_utterances)
        for sid in events:
            events[sid] += vad.feed(sid, two_utterances[i : i + step], i // 16, final=final).events
    assert pairs(events["x"]) == pairs(events["y"]) and len(pairs(events["x"])) == 2


def test_vad_unknown_session_or_gap_asks_for_replay(vad, two_utterances):
    assert vad.feed("late", two_utterances[:3200], 400).state_lost
    vad.feed("gap", two_utterances[:3200], 0)
    assert vad.feed("gap", two_utterances[:3200], 999).state_lost
    assert vad.close("gap") is False  # already dropped by the gap
    restarted = vad.feed("late", two_utterances[6400:9600], 400, restart=True)
    assert not restarted.state_lost
    assert vad.close("late") is True and vad.live_sessions == 0


def test_vad_reset_between_utterances_keeps_segments(tiny_models, two_utterances):
    """With a reset after every 1 s of silence, the cache stays small and both utterances are still found."""
    vad = VadCore(tiny_models.vad, VadSettings(max_end_silence_ms=600, reset_after_ms=1000))
    long_audio = np.concatenate([two_utterances] * 3)
    found = pairs(stream(vad, "long", long_audio))
    assert len(found) == 6
    offset = len(two_utterances) // 16
    for k, (start, _end) in enumerate(found):
        assert abs(start - (TWO_UTTERANCES_SPEECH_MS[k % 2][0] + offset * (k // 2))) < 400


def test_vad_segments_a_whole_file(vad, two_utterances):
    assert len(vad.segment(two_utterances)) == 2


def test_asr_batches_and_keeps_order(tiny_models, two_utterances):
    asr = AsrCore(tiny_models.asr, AsrSettings(threads=1))
    a, b = two_utterances[8000:44800], two_utterances[68800:112000]
    batch = asr.transcribe_batch([AsrRequest(a), AsrRequest(b), AsrRequest(a, use_itn=False)])
    assert [t.batch_size for t in batch] == [2, 2, 1]  # grouped by (language, itn)
    alone_a, alone_b = (asr.transcribe_batch([AsrRequest(x)])[0].raw_text for x in (a, b))
    assert alone_a != alone_b
    # Without dither the same audio gives the same text, alone or in any batch, run after run.
    assert [batch[0].raw_text, batch[1].raw_text] == [alone_a, alone_b]
    assert asr.transcribe_batch([AsrRequest(b), AsrRequest(a)])[1].raw_text == alone_a
    assert all(t.model_ms > 0 for t in batch)


def test_asr_with_funasr_default_dither_is_not_repeatable(tiny_models, two_utterances):
    """Why `asr.dither` defaults to 0: funasr's frontend adds random noise to every call, and
    the random-weight test model's near-flat logits show it (real weights flip words less often)."""
    asr = AsrCore(tiny_models.asr, AsrSettings(threads=1, dither=1.0))
    a = two_utterances[8000:44800]
    texts = {asr.transcribe_batch([AsrRequest(a)])[0].raw_text for _ in range(6)}
    assert len(texts) > 1


def test_asr_int8_quantizes_every_linear_layer_and_still_transcribes(tiny_models, two_utterances):
    """`asr.quantize: int8`: the Linear layers become dynamic int8 ones (what halves the CPU per
    utterance, README "Capacity"); batching and parsing work as before; fp32 stays the default."""
    import torch

    fp32 = AsrCore(tiny_models.asr, AsrSettings(threads=1, trace_encoder=False))
    int8 = AsrCore(tiny_models.asr, AsrSettings(threads=1, quantize="int8", trace_encoder=False))
    assert (fp32.precision, int8.precision) == ("fp32", "int8 (dynamic, Linear layers, onednn kernels)")
    assert torch.backends.quantized.engine == "onednn"  # asr.quantized_engine's default, for this process
    linear = [m for m in fp32.model.model.modules() if type(m) is torch.nn.Linear]
    assert linear and not [m for m in int8.model.model.modules() if type(m) is torch.nn.Linear]
    quantized = [m for m in int8.model.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert len(quantized) == len(linear)
    a, b = two_utterances[8000:44800], two_utterances[68800:112000]
    batch = int8.transcribe_batch([AsrRequest(a), AsrRequest(b)])
    assert [t.batch_size for t in batch] == [2, 2] and all(isinstance(t.raw_text, str) for t in batch)
    # Repeatable for the same batch; but activation scales are computed per batch, so unlike fp32 a
    # transcript may change with its batch-mates (README "Capacity" says so).
    assert int8.transcribe_batch([AsrRequest(a), AsrRequest(b)])[0].raw_text == batch[0].raw_text


@pytest.mark.parametrize("engine", ["x86", "fbgemm"])
def test_asr_int8_runs_on_the_kernels_asked_for(tiny_models, two_utterances, engine):
    """`asr.quantized_engine` packs the weights for, and runs, the kernels it names; the choice is
    process-wide in torch, so it is put back after."""
    import torch

    before = torch.backends.quantized.engine
    try:
        core = AsrCore(tiny_models.asr, AsrSettings(threads=1, quantize="int8", quantized_engine=engine))
        assert torch.backends.quantized.engine == engine and f"{engine} kernels)" in core.precision
        assert isinstance(core.transcribe_batch([AsrRequest(two_utterances[8000:44800])])[0].raw_text, str)
    finally:
        torch.backends.quantized.engine = before


def test_asr_int8_refuses_kernels_this_torch_lacks(tiny_models):
    from speech_serve.replicas.models import quantize_automodel

    asr = AsrCore(tiny_models.asr, AsrSettings(threads=1))
    with pytest.raises(ValueError, match="'armv9' is not supported by this torch build on this CPU"):
        quantize_automodel(asr.model, "int8", "cpu", "armv9")


def test_asr_int8_is_a_cpu_path(tiny_models):
    from speech_serve.replicas.models import quantize_automodel

    asr = AsrCore(tiny_models.asr, AsrSettings(threads=1))
    before = asr.model.model
    assert quantize_automodel(asr.model, "int8", "cuda:0").startswith("fp32 (int8 asked, ignored")
    assert asr.model.model is before
    with pytest.raises(ValueError, match="none or int8"):
        quantize_automodel(asr.model, "int4", "cpu")


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_asr_traced_encoder_gives_the_eager_transcripts(tiny_models, two_utterances, quantize):
    """`asr.trace_encoder` (the default): the encoder runs as a TorchScript trace of itself, and
    every clip of a batch of three lengths gets exactly the eager encoder's transcript."""
    import torch

    eager = AsrCore(tiny_models.asr, AsrSettings(threads=1, quantize=quantize, trace_encoder=False))
    traced = AsrCore(tiny_models.asr, AsrSettings(threads=1, quantize=quantize))
    assert traced.precision.endswith(", traced encoder") and "traced" not in eager.precision
    assert isinstance(traced.model.model.encoder, torch.jit.ScriptModule)
    assert not isinstance(eager.model.model.encoder, torch.jit.ScriptModule)
    batch = [AsrRequest(two_utterances[8000:44800]), AsrRequest(two_utterances[68800:112000]),
             AsrRequest(two_utterances[:9000])]  # fmt: skip
    want = [t.raw_text for t in eager.transcribe_batch(batch)]
    assert [t.raw_text for t in traced.transcribe_batch(batch)] == want
    alone = batch[2:]  # one clip: the trace was made with two
    assert traced.transcribe_batch(alone)[0].raw_text == eager.transcribe_batch(alone)[0].raw_text


def test_asr_a_trace_that_disagrees_is_not_used(tiny_models, monkeypatch, caplog):
    """The load-time check: a trace whose output differs from the eager encoder's leaves the
    eager encoder in place, and says so."""
    import torch

    from speech_serve.replicas.models import trace_encoder

    asr = AsrCore(tiny_models.asr, AsrSettings(threads=1, trace_encoder=False))
    eager = asr.model.model.encoder
    real_trace = torch.jit.trace

    def off_by_a_little(module, example, **kwargs):
        traced = real_trace(module, example, **kwargs)
        return lambda x, lengths: (traced(x, lengths)[0] + 1e-6, traced(x, lengths)[1])

    monkeypatch.setattr(torch.jit, "trace", off_by_a_little)
    assert trace_encoder(asr.model, "cpu") is None
    assert asr.model.model.encoder is eager and "disagrees with the eager one" in caplog.text


def test_asr_trace_is_a_cpu_path(tiny_models):
    from speech_serve.replicas.models import trace_encoder

    asr = AsrCore(tiny_models.asr, AsrSettings(threads=1, trace_encoder=False))
    eager = asr.model.model.encoder
    assert trace_encoder(asr.model, "cuda:0") is None and asr.model.model.encoder is eager


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


def test_vad_reset_keeps_the_session_cache_from_growing(tiny_models, two_utterances):
    """fsmn keeps one output_data_buf entry per segment it ever found; resets drop them."""

    def segments_held(reset_after_ms: int) -> int:
        vad = VadCore(tiny_models.vad, VadSettings(max_end_silence_ms=600, reset_after_ms=reset_after_ms))
        audio = np.concatenate([two_utterances] * 8)
        for i in range(0, len(audio), 3200):
            vad.feed("s", audio[i : i + 3200], i // 16)
        return len(vad._streams["s"].cache["stats"].output_data_buf)

    assert segments_held(reset_after_ms=10**9) >= 14  # without resets: grows with the session
    assert segments_held(reset_after_ms=5000) <= 2


def test_vad_batched_step_keeps_sessions_apart_and_fails_a_bad_chunk_alone(vad, two_utterances):
    """feed_many (one VADHost call for a lane) gives each session what feed alone gives it; a chunk
    that raises gets an error result, and the rest of its batch goes on."""
    from speech_serve.messages import VadChunk, VadItem

    step, events = 200 * 16, {"m": [], "n": []}
    for i in range(0, len(two_utterances), step):
        final = i + step >= len(two_utterances)
        chunk = VadChunk(two_utterances[i : i + step], i // 16, final=final)
        bad = VadItem("bad", VadChunk(None, 0)) if i == 0 else VadItem("bad", None)
        results = vad.feed_many([VadItem("m", chunk), bad, VadItem("n", chunk)])
        assert results[1].events == [] and (results[1].error is not None) == (i == 0)
        events["m"] += results[0].events
        events["n"] += results[2].events
    assert pairs(events["m"]) == pairs(events["n"]) == pairs(stream(vad, "alone", two_utterances))
    assert vad.live_sessions == 0


def test_vad_forgets_sessions_nobody_has_fed_for_session_idle_s(tiny_models, two_utterances):
    """An Ingress that crashed never sends `final` or a close: its sessions' state must not stay on
    the VADHost for ever (it counts in live_sessions, which drives routing and autoscaling)."""
    from speech_serve.messages import VadChunk, VadItem

    now = [1000.0]
    vad = VadCore(tiny_models.vad, VadSettings(session_idle_s=300), clock=lambda: now[0])
    chunk = two_utterances[:3200]
    vad.feed_many([VadItem("orphan", VadChunk(chunk, 0)), VadItem("alive", VadChunk(chunk, 0))])
    now[0] += 200
    vad.feed_many([VadItem("alive", VadChunk(chunk, 200))])
    assert vad.live_sessions == 2
    now[0] += 150  # orphan: 350 s without audio; alive: 150 s
    assert vad.live_sessions == 1  # stats are right before any call comes (all callers may be gone)
    vad.feed_many([VadItem("alive", VadChunk(chunk, 400))])
    assert set(vad._streams) == {"alive"}  # its memory is freed at the next call
    # Should the orphan come back after all, it is asked to replay, as after a replica change.
    assert vad.feed("orphan", chunk, 200).state_lost

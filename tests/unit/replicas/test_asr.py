"""SenseVoice's core (replicas/asr.py) on the tiny model: batches in order, dither, int8, the traced
encoder; and the parsing of its tagged transcripts."""

import pytest

from speech_serve.messages import AsrRequest
from speech_serve.replicas.asr import AsrCore, parse_sensevoice
from speech_serve.settings import AsrSettings


def test_tags_become_fields_and_leave_the_text():
    text, lang, emo, event = parse_sensevoice("<|en|><|HAPPY|><|Speech|><|withitn|>Turn on the light.")
    assert (text, lang, emo, event) == ("Turn on the light.", "en", "happy", "Speech")


def test_unknown_emotion_and_missing_tags():
    assert parse_sensevoice("<|zh|><|EMO_UNKNOWN|><|BGM|><|woitn|>你好") == ("你好", "zh", "unknown", "BGM")
    assert parse_sensevoice("plain words") == ("plain words", None, None, None)


def test_stray_tags_inside_text_are_removed():
    assert parse_sensevoice("<|ja|>a <|nospeech|> b")[0] == "a b"


def test_asr_batches_and_keeps_order(tiny_models, two_utterances):
    # fp32: int8's activation scales are per batch, so its transcripts may change with batch-mates
    asr = AsrCore(tiny_models.asr, AsrSettings(threads=1, quantize="none"))
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
    utterance, docs/benchmarks.md); batching and parsing work as before; `auto` (the default) is
    int8 on CPU."""
    import torch

    fp32 = AsrCore(tiny_models.asr, AsrSettings(threads=1, quantize="none", trace_encoder=False))
    int8 = AsrCore(tiny_models.asr, AsrSettings(threads=1, quantize="int8", trace_encoder=False))
    assert AsrSettings().quantize == "auto"
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
    # transcript may change with its batch-mates (docs/benchmarks.md says so).
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


def test_the_warm_up_times_one_utterance_and_a_full_batch_of_the_replicas_own_shapes(tiny_models):
    asr = AsrCore(tiny_models.asr, AsrSettings(threads=1))
    sizes = []
    run = asr.transcribe_batch
    asr.transcribe_batch = lambda requests: sizes.append([len(r.pcm) for r in requests]) or run(requests)
    single_s, batch_s = asr.time_batches(utterance_s=1.5, batch=4, repeats=3)
    assert single_s > 0 and batch_s > 0
    assert sizes == [[24000]] * 4 + [[24000] * 4] * 3  # an untimed first call, then three of each


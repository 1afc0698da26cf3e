from speech_serve.loadtest.records import LoadConfig, RunState, UtteranceRecord, load_corpus
from speech_serve.loadtest.report import cer, summarize


def test_cer():
    assert cer("Turn on the light", "turn on the light.") == 0.0
    assert cer("abcd", "abed") == 0.25
    assert cer("今天天气怎么样", "<|zh|>今天天气怎样") == 1 / 7
    assert cer("", "") == 0.0


def test_corpus_has_transcripts_for_every_clip():
    clips = load_corpus(__import__("pathlib").Path("loadtest/corpus"))
    assert len(clips) >= 30 and all(c.text for c in clips) and all(1 < c.seconds < 6 for c in clips)


def test_summary_counts_lost_and_latency():
    state = RunState(started=0.0)
    for i in range(4):
        r = UtteranceRecord(
            device=0, protocol="plain", seq=i, clip="x", reference="ab", audio_s=1.0, speech_end_t=10.0 * i
        )
        if i < 3:
            r.result_t, r.text, r.models = 10.0 * i + 0.5 + i * 0.1, "ab", "real"
        state.records.append(r)
    s = summarize(LoadConfig(), state)
    assert (s["utterances_sent"], s["results"], s["lost"]) == (4, 3, 1)
    assert s["latency_s"]["p50"] == 0.6 and s["cer"] == 0.0

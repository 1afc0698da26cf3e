"""A load run's records (loadtest/records.py): the corpus as the devices speak it, and latency."""

import numpy as np
import soundfile as sf

from speech_serve.loadtest.records import UtteranceRecord, load_corpus


def test_a_corpus_of_any_rate_and_channels_is_read_at_16_khz_mono_with_its_transcripts(tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros((8000, 2), np.int16), 8000)  # 1 s, stereo, 8 kHz
    sf.write(tmp_path / "b.wav", np.zeros(16000, np.int16), 16000)
    (tmp_path / "transcripts.tsv").write_text("a.wav\thello there\n", encoding="utf-8")
    a, b = load_corpus(tmp_path)
    assert (a.name, a.text, b.text) == ("a.wav", "hello there", None)
    assert abs(a.seconds - 1.0) < 0.01 and a.pcm.ndim == 1 and b.seconds == 1.0


def test_latency_runs_from_the_last_speech_frame_to_the_result():
    record = UtteranceRecord(device=0, protocol="plain", seq=0, clip="a.wav", reference=None, audio_s=1.0,
                             speech_end_t=10.0)  # fmt: skip
    assert record.latency_s is None  # no result (yet)
    record.result_t = 11.25
    assert record.latency_s == 1.25

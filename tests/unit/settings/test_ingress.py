"""The Ingress's settings sections (settings/ingress.py): their bounds are checked where they are read."""

import pytest
from pydantic import ValidationError

from speech_serve.settings import AppSettings, DrainSettings, LimitSettings, StreamSettings, UploadSettings


def test_a_session_waits_for_its_pause_only_within_the_drain_margin():
    assert DrainSettings(margin_s=30, idle_wait_s=10).idle_wait_s == 10
    with pytest.raises(ValidationError, match="drain.idle_wait_s must be shorter than drain.margin_s"):
        DrainSettings(margin_s=10, idle_wait_s=10)


@pytest.mark.parametrize("section, bad", [
    (StreamSettings, {"min_utterance_ms": 0}),  # an empty utterance fails a model batch
    (StreamSettings, {"max_utterances_in_flight": 0}),
    (LimitSettings, {"max_text_frame_bytes": 10}),
    (LimitSettings, {"max_audio_rate": 0}),
    (UploadSettings, {"max_concurrent": 0}),
    (UploadSettings, {"max_sample_rate": 4000}),
])  # fmt: skip
def test_values_that_would_break_the_service_are_refused(section, bad):
    with pytest.raises(ValidationError):
        section(**bad)


def test_each_section_is_its_own_key_and_none_is_over_the_others():
    settings = AppSettings(stream={"vad_chunk_ms": 100}, limits={"idle_timeout_s": 5}, uploads={"max_bytes": 10})
    assert (settings.stream.vad_chunk_ms, settings.limits.idle_timeout_s, settings.uploads.max_bytes) == (100, 5, 10)
    assert settings.drain == DrainSettings() and settings.health.timeout_s == 5.0

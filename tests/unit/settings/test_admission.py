"""Admission's settings: shedding comes before refusing, and the compute cap's new home."""

import pytest
from pydantic import ValidationError

from speech_serve.settings import AdmissionSettings, AppSettings, ComputeSettings


def test_the_compute_cap_is_measured_by_default_and_can_be_pinned_or_turned_off():
    assert ComputeSettings().sessions_per_asr_replica == "measured"
    assert ComputeSettings(sessions_per_asr_replica=10).sessions_per_asr_replica == 10
    assert ComputeSettings(sessions_per_asr_replica=None).sessions_per_asr_replica is None
    with pytest.raises(ValidationError):
        ComputeSettings(sessions_per_asr_replica=0)
    with pytest.raises(ValidationError):
        ComputeSettings(utilization=0)


def test_the_old_key_says_where_it_went():
    with pytest.raises(ValidationError, match="moved to compute.sessions_per_asr_replica"):
        AppSettings(admission={"sessions_per_asr_replica": 8})


def test_optional_work_is_shed_before_devices_are_refused():
    AdmissionSettings(shed_interims_delay_s=0.5, shed_speaker_delay_s=1.0, max_queue_delay_s=2.0)
    with pytest.raises(ValidationError, match="before devices are refused"):
        AdmissionSettings(shed_speaker_delay_s=3.0, max_queue_delay_s=2.0)

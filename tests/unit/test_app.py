"""The builder's CPU reservations for model replicas (placement num_cpus: null)."""

from speech_serve.app import fit_model_cpus
from speech_serve.settings import AppSettings


def test_a_model_replica_reserves_its_threads_where_they_fit():
    cpus, why = fit_model_cpus(AppSettings(), node_cpus=16)
    assert cpus == {"SenseVoice": 2.0, "Speaker": 2.0} and "thread" in why


def test_on_a_small_node_the_reservations_shrink_so_one_of_each_fits_and_no_second_does():
    settings = AppSettings()
    cpus, why = fit_model_cpus(settings, node_cpus=2)
    light = settings.placement["Ingress"].num_cpus + settings.placement["VADHost"].num_cpus
    assert abs(sum(cpus.values()) + light - 2) < 0.02  # the node is full: an extra replica waits
    assert cpus["SenseVoice"] == cpus["Speaker"] and "2-CPU node" in why


def test_a_disabled_speaker_reserves_nothing_and_explicit_numbers_are_kept():
    settings = AppSettings(speaker={"enabled": False})
    assert fit_model_cpus(settings, node_cpus=2)[0] == {"SenseVoice": 1.8, "Speaker": 0.0}
    explicit = AppSettings(placement={"SenseVoice": {"num_cpus": 0.5}, "Speaker": {"num_cpus": 0.25}})
    assert fit_model_cpus(explicit, node_cpus=2) == ({}, "")
    assert fit_model_cpus(AppSettings(), node_cpus=None)[0] == {"SenseVoice": 2.0, "Speaker": 2.0}

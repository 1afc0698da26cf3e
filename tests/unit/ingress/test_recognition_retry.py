"""The retry clock for calls whose replica was lost (the integration tests kill real replicas)."""

import pytest
import yaml

from serve_app.ingress.recognition import RetryClock
from serve_app.settings import AppSettings, RetrySettings


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_first_retry_is_immediate_then_backoff_doubles_up_to_the_cap():
    now = FakeTime()
    clock = RetryClock(RetrySettings(deadline_s=1000, backoff_s=0.5, max_backoff_s=3), now)
    assert clock.remaining_s() is None  # a first try is never timed
    waits = [clock.failed() for _ in range(6)]
    assert waits == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert clock.retries == 6


def test_the_deadline_counts_from_the_first_failure_and_bounds_every_wait_and_try():
    now = FakeTime()
    clock = RetryClock(RetrySettings(deadline_s=10, backoff_s=4, max_backoff_s=8), now)
    now.t += 500  # a slow first try (queued under load) does not eat the budget
    assert clock.failed() == 0.0
    assert clock.remaining_s() == 10
    now.t += 7  # the retry waited 7 s in the router for a replacement, then failed again
    assert clock.remaining_s() == 3
    assert clock.failed() == 3  # the 4 s backoff is cut to what is left
    now.t += 3
    assert clock.remaining_s() == 0
    assert clock.failed() is None  # budget spent: give up


def test_default_budget_outlasts_a_replica_restart():
    """Measured here: Serve notices a dead replica within health_check_period_s (2 s) and a
    replacement with test models runs about 10 s later; full models take longer to load."""
    s = RetrySettings()
    assert s.deadline_s >= 30 and s.max_backoff_s < s.deadline_s


def test_shipped_config_sets_the_retry_budget_and_fast_health_checks():
    with open("config/serve.yaml") as f:
        (app,) = yaml.safe_load(f)["applications"]
    settings = AppSettings(**app["args"])
    assert settings.retry == RetrySettings(**app["args"]["retry"])
    assert settings.asr.dither == 0.0
    periods = {d["name"]: d.get("health_check_period_s") for d in app["deployments"]}
    assert all(periods[name] is not None and periods[name] <= 5 for name in ("VADHost", "SenseVoice", "Speaker"))


@pytest.mark.parametrize("bad", [{"deadline_s": "soon"}, {"retries": 3}])
def test_bad_retry_settings_are_refused(bad):
    with pytest.raises(ValueError):
        AppSettings(retry=bad)

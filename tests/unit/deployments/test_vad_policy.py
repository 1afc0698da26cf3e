from types import SimpleNamespace

import pytest

from speech_serve.replicas.vad import SessionsPolicy, replicas_for_sessions


@pytest.mark.parametrize("sessions, expected", [(0, 1), (1, 1), (50, 1), (51, 2), (100, 2), (101, 3), (499.5, 10)])
def test_replicas_for_sessions(sessions, expected):
    assert replicas_for_sessions(sessions, 50) == expected


def ctx(metrics, target=2):
    return SimpleNamespace(aggregated_metrics=metrics, target_num_replicas=target)


def test_policy_sums_sessions_over_replicas():
    policy = SessionsPolicy(sessions_per_replica=10)
    decision, state = policy(ctx({"live_sessions": {"r1": 9.0, "r2": 12.0, "r3": 4.0}}))
    assert decision == 3 and state == {"live_sessions": 25.0}
    assert policy(ctx({"live_sessions": {"r1": 0.0}}))[0] == 1


def test_policy_keeps_the_target_until_replicas_report():
    assert SessionsPolicy()(ctx(None, target=3)) == (3, {})
    assert SessionsPolicy()(ctx({"other": {"r1": 1.0}}, target=2)) == (2, {})
    with pytest.raises(ValueError):
        SessionsPolicy(0)

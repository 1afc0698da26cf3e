import pytest

from serve_app.auth import AuthConfigError, DeviceAuth, check_device, issue_token
from serve_app.protocols.xiaozhi import ConnectParams
from serve_app.settings import XiaozhiSettings

SECRET, NOW, DAY = "s3cret", 1_800_000_000, 86400


def check(token, client="c1", device="d1", now=NOW, allowed=frozenset()):
    return check_device(token, client, device, SECRET, 30 * DAY, allowed, now=now)


def test_a_fresh_token_for_this_device_and_client_passes():
    token = issue_token(SECRET, "c1", "d1", now=NOW)
    assert check(f"Bearer {token}").ok and check(token).ok


@pytest.mark.parametrize(
    "token, kwargs, reason",
    [
        (issue_token("other", "c1", "d1", now=NOW), {}, "invalid token"),
        (issue_token(SECRET, "c1", "d2", now=NOW), {}, "invalid token"),  # issued to another device
        (issue_token(SECRET, "c9", "d1", now=NOW), {}, "invalid token"),  # or another client
        (issue_token(SECRET, "c1", "d1", now=NOW - 31 * DAY), {}, "token expired"),
        (issue_token(SECRET, "c1", "d1", now=NOW + 3600), {}, "token from the future"),
        ("garbage", {}, "malformed token"),
        (None, {}, "missing Authorization token"),
        (issue_token(SECRET, "c1", "d1", now=NOW), {"device": None}, "missing Device-Id"),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(token, kwargs, reason):
    decision = check(token, **kwargs)
    assert not decision.ok and decision.reason == reason


def test_allow_listed_devices_need_no_token():
    assert check(None, device="trusted", allowed=frozenset({"trusted"})).ok


def test_device_auth_from_settings():
    assert DeviceAuth.from_settings(XiaozhiSettings()).check(ConnectParams(None, None, 1, None)).ok  # disabled
    enabled = XiaozhiSettings(auth_enabled=True, secret_env="TEST_SECRET")
    with pytest.raises(AuthConfigError, match="TEST_SECRET"):
        DeviceAuth.from_settings(enabled, environ={})
    auth = DeviceAuth.from_settings(enabled, environ={"TEST_SECRET": SECRET})
    assert auth.check(ConnectParams("d1", "c1", 1, "Bearer " + issue_token(SECRET, "c1", "d1"))).ok
    assert not auth.check(ConnectParams("d1", "c1", 1, None)).ok

import subprocess
import sys
from urllib.parse import parse_qsl, urlsplit

import pytest

from speech_serve.cli.tokens import main
from speech_serve.ingress import auth as security
from speech_serve.ingress.auth import (
    AdminAuth,
    CredentialError,
    Credentials,
    DeviceAuth,
    Identity,
    check_device,
    device_auth_required,
    device_credentials,
    is_loopback,
)
from speech_serve.ingress.protocols.xiaozhi import ConnectParams, connect_params
from speech_serve.ingress.redaction import MIN_SECRET_LEN, redact
from speech_serve.settings import SecuritySettings
from speech_serve.wire.tokens import device_headers, issue_token, url_with_token

SECRET, NOW, DAY = "s3cret-for-unit-tests", 1_800_000_000, 86400


def check(token, client="c1", device="d1", now=NOW, allowed=frozenset()):
    return check_device(token, client, device, SECRET, 30 * DAY, allowed, now=now)


def test_a_fresh_token_for_this_device_and_client_passes():
    token = issue_token(SECRET, "c1", "d1", now=NOW)
    assert check(f"Bearer {token}").ok and check(token).ok and check(f"bearer  {token}").ok


def test_xiaozhi_servers_funasr_provider_spelling_of_bearer_passes():
    """xiaozhi-esp32-server's FunASR-server provider sends `Authorization: Bearer; <api_key>` (fun_server.py);
    tests/integration/test_xiaozhi_server_provider.py runs it."""
    token = issue_token(SECRET, "", "xiaozhi-server", now=NOW)
    assert check(f"Bearer; {token}", client=None, device="xiaozhi-server").ok
    creds = device_credentials({"authorization": f"Bearer; {token}"}, {"device_id": "xiaozhi-server", "token": token})
    assert creds.authorization == f"Bearer; {token}"  # the same token as the query's: no conflict
    assert not check(f"Bearer;; {token}", client=None, device="xiaozhi-server").ok  # no looser than that


def test_a_token_minted_without_client_id_serves_clients_that_send_none():
    """Plain and FunASR clients send no Client-Id: the token is signed over an empty one."""
    token = issue_token(SECRET, "", "kitchen", now=NOW)
    assert check(token, client=None, device="kitchen").ok
    assert not check(token, client="c1", device="kitchen").ok


@pytest.mark.parametrize(
    "token, kwargs, reason, status",
    [
        (issue_token("other", "c1", "d1", now=NOW), {}, "invalid token", 403),
        (issue_token(SECRET, "c1", "d2", now=NOW), {}, "invalid token", 403),  # issued to another device
        (issue_token(SECRET, "c9", "d1", now=NOW), {}, "invalid token", 403),  # or another client
        (issue_token(SECRET, "c1", "d1", now=NOW - 31 * DAY), {}, "token expired", 403),
        (issue_token(SECRET, "c1", "d1", now=NOW + 3600), {}, "token from the future", 403),
        ("garbage", {}, "malformed token", 403),
        (None, {}, "missing token", 401),
        (issue_token(SECRET, "c1", "d1", now=NOW), {"device": None}, "missing device id", 401),
    ],
)
def test_bad_tokens_are_refused_with_a_reason(token, kwargs, reason, status):
    decision = check(token, **kwargs)
    assert not decision.ok and decision.reason.startswith(reason) and decision.status == status


def test_missing_credentials_say_how_to_send_them():
    assert "Device-Id header or the device_id parameter" in check("x", device=None).reason
    assert "Authorization: Bearer <token> or the token parameter" in check(None).reason


def test_allow_listed_devices_need_no_token():
    assert check(None, device="trusted", allowed=frozenset({"trusted"})).ok


@pytest.mark.parametrize(
    "mode, host, on",
    [
        ("auto", "127.0.0.1", False),
        ("auto", "127.0.1.1", False),
        ("auto", "::1", False),
        ("auto", "[::1]", False),
        ("auto", "localhost", False),
        ("auto", "0.0.0.0", True),
        ("auto", "::", True),
        ("auto", "192.168.1.20", True),
        ("auto", "speech.lan", True),  # a name may resolve to anything
        ("auto", None, True),  # unknown: fail safe
        ("on", "127.0.0.1", True),
        ("off", "0.0.0.0", False),
    ],
)
def test_device_auth_is_on_unless_bound_to_loopback_or_switched(mode, host, on):
    enabled, why = device_auth_required(mode, host)
    assert enabled is on and f"device_auth: {mode}" in why
    assert (host or "could not be learned") in why


def test_bind_host_is_unknown_outside_a_ray_cluster_and_no_ray_is_started():
    """In a fresh process (this one may hold the integration tests' Ray)."""
    code = (
        "import ray; from speech_serve.ingress.auth import serve_bind_host; "
        "print(serve_bind_host(timeout_s=1), ray.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["None", "False"], out.stderr[-2000:]
    assert device_auth_required("auto", None)[0] is True  # which fails safe


def test_is_loopback_rejects_empty_and_names():
    assert not is_loopback("") and not is_loopback(None) and not is_loopback("example.com")


def test_device_auth_from_settings():
    settings = SecuritySettings(device_secret_env="TEST_SECRET", allowed_devices=["trusted"])
    off = DeviceAuth.from_settings(settings, "127.0.0.1", environ={"TEST_SECRET": SECRET})
    assert not off.enabled and off.secret == "" and off.check(Credentials(None, None, None)).ok
    auth = DeviceAuth.from_settings(settings, "0.0.0.0", environ={"TEST_SECRET": SECRET})
    assert auth.enabled and auth.problem is None
    accepted = auth.check(Credentials("d1", "c1", "Bearer " + issue_token(SECRET, "c1", "d1")))
    assert accepted.ok and accepted.identity == Identity("d1", "c1", "device:d1", group_fixed=True)
    assert not auth.check(Credentials("d1", "c1", None)).ok


@pytest.mark.parametrize("device", ["kitchen", "default"])
def test_a_device_named_like_a_household_is_not_matched_against_that_household(device):
    """An unmapped device's group was its id: a device calling itself `kitchen` (or `default`, the
    default group) was matched against that household's voiceprints."""
    settings = SecuritySettings(device_secret_env="TEST_SECRET", device_groups={"oven": "kitchen"})
    auth = DeviceAuth.from_settings(settings, "0.0.0.0", environ={"TEST_SECRET": SECRET})
    identity = auth.check(Credentials(device, "", "Bearer " + issue_token(SECRET, "", device))).identity
    assert identity.group == f"device:{device}" and identity.speaker_group(None) not in ("kitchen", "default")
    oven = auth.check(Credentials("oven", "", "Bearer " + issue_token(SECRET, "", "oven"))).identity
    assert oven.speaker_group(None) == "kitchen"  # a mapped device is in its household


def test_auth_on_without_a_secret_starts_but_refuses_devices_naming_the_variable():
    settings = SecuritySettings(device_auth="on", device_secret_env="TEST_SECRET", allowed_devices=["trusted"])
    auth = DeviceAuth.from_settings(settings, None, environ={})
    assert auth.enabled and "TEST_SECRET" in auth.problem and "device_auth: on" in auth.problem
    refused = auth.check(Credentials("d1", "", "Bearer " + issue_token("", "", "d1")))  # even a token signed
    assert not refused.ok and refused.status == 503 and "TEST_SECRET" in refused.reason  # with the empty secret
    assert auth.check(Credentials("trusted", None, None)).ok  # the allow-list needs no secret


def test_credentials_from_headers_or_query_parameters():
    by_header = device_credentials({"device-id": "d1", "client-id": "c1", "authorization": "Bearer t"}, {})
    assert (by_header.device_id, by_header.client_id, by_header.authorization) == ("d1", "c1", "Bearer t")
    by_query = device_credentials({}, {"device_id": "d2", "token": "t2"})
    assert (by_query.device_id, by_query.client_id, by_query.authorization) == ("d2", None, "t2")
    both = device_credentials({"device-id": "d3", "authorization": "Bearer t3"}, {"device_id": "d3", "token": "t3"})
    assert (both.device_id, both.authorization) == ("d3", "Bearer t3")  # the same, given twice: fine
    # OpenAI's browser Realtime clients offer the key as a subprotocol; it must agree with any other
    protocols = ["realtime", "openai-insecure-api-key.t4", "openai-beta.realtime-v1"]
    assert device_credentials({}, {"device_id": "d4"}, protocols).authorization == "t4"
    with pytest.raises(CredentialError):
        device_credentials({"authorization": "Bearer other"}, {"device_id": "d4"}, protocols)


def test_client_helpers_put_credentials_where_the_server_reads_them():
    token = issue_token(SECRET, "", "d 1")
    headers = {k.lower(): v for k, v in device_headers("d 1", token).items()}
    assert device_credentials(headers, {}).authorization == f"Bearer {token}"
    url = url_with_token("ws://h:1/funasr?x=1", "d 1", token)
    query = dict(parse_qsl(urlsplit(url).query))
    creds = device_credentials({}, query)
    assert query["x"] == "1" and (creds.device_id, creds.authorization) == ("d 1", token)
    assert url_with_token("ws://h:1/", None, None) == "ws://h:1/" and device_headers(None, None) == {}


def test_xiaozhi_spellings_and_the_token_query_parameter():
    creds = device_credentials({}, {"device-id": "d1", "client-id": "c1", "token": "abc.1"})
    assert (creds.device_id, creds.client_id, creds.authorization) == ("d1", "c1", "abc.1")
    assert connect_params({}, {"device-id": "d1", "protocol-version": "2"}) == ConnectParams(2)


def test_admin_token():
    settings = SecuritySettings(admin_token_env="TEST_ADMIN")
    unset = AdminAuth.from_settings(settings, environ={}).check("Bearer anything")
    assert (unset.ok, unset.status) == (False, 503) and "TEST_ADMIN" in unset.reason
    admin = AdminAuth.from_settings(settings, environ={"TEST_ADMIN": "right-admin-token"})
    assert admin.check(None).status == 401 and admin.check("").status == 401
    for wrong in ("Bearer wrong", "Bearer right-admin-toke", "Bearer right-admin-token-and-more", "Basic x"):
        decision = admin.check(wrong)
        assert (decision.ok, decision.status) == (False, 403), wrong
    assert admin.check("Bearer right-admin-token").ok and admin.check("right-admin-token").ok


def test_mint_cli_reads_the_secret_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("TEST_MINT_SECRET", SECRET)
    main(["--device-id", "aa:bb", "--secret-env", "TEST_MINT_SECRET"])
    token = capsys.readouterr().out.strip()
    assert check(token, client=None, device="aa:bb", now=None).ok
    monkeypatch.delenv("TEST_MINT_SECRET")
    with pytest.raises(SystemExit, match="TEST_MINT_SECRET"):
        main(["--device-id", "aa:bb", "--secret-env", "TEST_MINT_SECRET"])


@pytest.mark.parametrize(
    "token",
    [
        "é" * 43 + f".{NOW}",  # non-ASCII signature: hmac.compare_digest raised TypeError on str
        "ü.1800000000",
        "\udcff" * 43 + f".{NOW}",  # a lone surrogate (never from a real header, but from nowhere else either)
        f"{issue_token(SECRET, 'c1', 'd1', now=NOW).split('.')[0]}.²",  # '²'.isdigit() is True; int('²') raises
        f"{issue_token(SECRET, 'c1', 'd1', now=NOW).split('.')[0]}.１８００００００００",  # fullwidth digits
        f"{issue_token(SECRET, 'c1', 'd1', now=NOW).split('.')[0]}.{'9' * 5000}",  # past int()'s digit limit
        "." + str(NOW),
        "a" * 43 + ".",
    ],
)
def test_odd_tokens_are_refused_as_malformed_without_raising(token):
    decision = check(token)
    assert (decision.ok, decision.status) == (False, 403) and decision.reason == "malformed token"


def test_the_signed_string_is_unambiguous():
    """`client|device|ts` signed "a|b" + "c" and "a" + "b|c" alike: ids may not hold the separator."""
    with pytest.raises(ValueError, match=r"\|"):
        issue_token(SECRET, "a|b", "c", now=NOW)
    import base64
    import hashlib
    import hmac

    digest = hmac.new(SECRET.encode(), f"a|b|c|{NOW}".encode(), hashlib.sha256).digest()
    forged = base64.urlsafe_b64encode(digest).decode().rstrip("=")  # the old token of client "a|b", device "c"
    refused = check(f"{forged}.{NOW}", client="a|b", device="c")
    assert not refused.ok and refused.status == 400 and "|" in refused.reason
    assert not check(f"{forged}.{NOW}", client="a", device="b|c").ok


def test_tokens_issued_before_the_change_still_pass():
    """Ids without the separator sign exactly as before (and as the Xiaozhi reference server)."""
    import base64
    import hashlib
    import hmac

    old = base64.urlsafe_b64encode(hmac.new(SECRET.encode(), f"c1|d1|{NOW}".encode(), hashlib.sha256).digest())
    assert check(f"{old.decode().rstrip('=')}.{NOW}").ok


@pytest.mark.parametrize("which, env", [("device", "TEST_SECRET"), ("admin", "TEST_ADMIN")])
def test_a_short_secret_is_a_startup_error_naming_the_variable(which, env):
    settings = SecuritySettings(device_auth="on", device_secret_env="TEST_SECRET", admin_token_env="TEST_ADMIN")
    environ = {"TEST_SECRET": SECRET, "TEST_ADMIN": "right-admin-token", env: "abc"}
    with pytest.raises(security.InsecureSecret) as err:
        if which == "device":
            DeviceAuth.from_settings(settings, "0.0.0.0", environ=environ)
        else:
            AdminAuth.from_settings(settings, environ=environ)
    assert env in str(err.value) and "at least 16 characters" in str(err.value)
    assert "abc" not in str(err.value)  # the value is never echoed


def test_every_secret_long_enough_to_be_accepted_is_redacted():
    with pytest.raises(ValueError):
        SecuritySettings(min_secret_chars=MIN_SECRET_LEN - 1)
    secret = "x" * SecuritySettings().min_secret_chars
    assert secret not in redact(f"oops {secret}", [secret])


def test_the_mint_cli_refuses_a_short_secret(monkeypatch):
    monkeypatch.setenv("TEST_MINT_SECRET", "short")
    with pytest.raises(SystemExit, match="at least"):
        main(["--device-id", "aa:bb", "--secret-env", "TEST_MINT_SECRET"])

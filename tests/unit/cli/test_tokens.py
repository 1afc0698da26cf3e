"""`speech-serve token`: one token printed, or many written to a 0600 CSV (speech_serve/cli/tokens.py)."""

import csv
import re
import stat

import pytest

from speech_serve.cli.tokens import main
from speech_serve.ingress.auth import check_device

SECRET = "a-device-secret-of-enough-length"
MAX_AGE_S = 3600


@pytest.fixture(autouse=True)
def secret(monkeypatch):
    monkeypatch.setenv("SPEECH_SERVE_DEVICE_SECRET", SECRET)


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_bulk_issue_writes_valid_tokens_for_distinct_mac_like_devices_to_an_owner_only_file(tmp_path, capsys):
    out = tmp_path / "devices.csv"
    main(["issue", "--count", "25", "--out", str(out)])
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    devices = rows(out)
    assert len(devices) == 25 and len({d["device_id"] for d in devices}) == 25
    assert all(re.fullmatch(r"02(:[0-9a-f]{2}){5}", d["device_id"]) for d in devices)
    assert len({d["client_id"] for d in devices}) == 25  # a UUID each, as Xiaozhi devices send
    for d in devices:
        decision = check_device(f"Bearer {d['token']}", d["client_id"], d["device_id"], SECRET, MAX_AGE_S)
        assert decision.ok, decision
    printed = capsys.readouterr()
    assert "wrote 25 device tokens" in printed.out
    assert SECRET not in printed.out + printed.err and devices[0]["token"] not in printed.out + printed.err


def test_a_prefix_names_the_devices_and_client_ids_can_be_left_empty(tmp_path):
    out = tmp_path / "kitchen.csv"
    main(["issue", "--count", "12", "--out", str(out), "--prefix", "kitchen-", "--no-client-id"])
    devices = rows(out)
    assert [d["device_id"] for d in devices[:2]] == ["kitchen-01", "kitchen-02"]
    assert devices[-1]["device_id"] == "kitchen-12"
    assert {d["client_id"] for d in devices} == {""}
    assert check_device(f"Bearer {devices[0]['token']}", "", "kitchen-01", SECRET, MAX_AGE_S).ok
    assert not check_device(f"Bearer {devices[0]['token']}", "", "kitchen-02", SECRET, MAX_AGE_S).ok


def test_an_existing_file_is_never_replaced(tmp_path):
    out = tmp_path / "devices.csv"
    out.write_text("handed out already\n")
    with pytest.raises(SystemExit, match="exists"):
        main(["issue", "--count", "1", "--out", str(out)])
    assert out.read_text() == "handed out already\n"


def test_no_secret_no_file_and_bad_counts_are_refused(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["issue", "--count", "0", "--out", str(tmp_path / "a.csv")])
    assert "--count must be at least 1" in capsys.readouterr().err
    monkeypatch.delenv("SPEECH_SERVE_DEVICE_SECRET")
    with pytest.raises(SystemExit, match="SPEECH_SERVE_DEVICE_SECRET"):
        main(["issue", "--count", "2", "--out", str(tmp_path / "b.csv")])
    assert not (tmp_path / "b.csv").exists()


def test_the_single_token_usage_still_prints_one(capsys):
    main(["--device-id", "aa:bb:cc:dd:ee:ff"])
    token = capsys.readouterr().out.strip()
    assert check_device(f"Bearer {token}", "", "aa:bb:cc:dd:ee:ff", SECRET, MAX_AGE_S).ok
    main(["issue", "--device-id", "aa:bb", "--client-id", "c1"])
    token = capsys.readouterr().out.strip()
    assert check_device(f"Bearer {token}", "c1", "aa:bb", SECRET, MAX_AGE_S).ok

"""The vendored xiaozhi-esp32-server files are the upstream ones, byte for byte (tests/vendor/xiaozhi_server/
README.md records their commit, git blob ids and sha256)."""

import hashlib
import sys
from pathlib import Path

import pytest

from tests.support.xiaozhi_server import PINNED_COMMIT, PROVIDER, UNCHANGED, VENDOR, git_blob_id, provider_class


@pytest.mark.parametrize("path", sorted(UNCHANGED))
def test_vendored_file_is_upstreams_unchanged(path):
    data = (VENDOR / path).read_bytes()
    blob, sha256 = UNCHANGED[path]
    assert git_blob_id(data) == blob, f"{path} differs from upstream's {PINNED_COMMIT[:12]}: restore it, do not edit it"
    assert hashlib.sha256(data).hexdigest() == sha256


def test_the_vendor_readme_records_the_same_commit_and_ids():
    readme = (VENDOR / "README.md").read_text()
    assert PINNED_COMMIT in readme
    for path, (blob, sha256) in UNCHANGED.items():
        assert f"`{path}`" in readme and blob in readme and sha256 in readme, path


def test_the_provider_imports_from_its_vendored_tree():
    provider = provider_class()
    assert Path(sys.modules[provider.__module__].__file__).samefile(VENDOR / PROVIDER)

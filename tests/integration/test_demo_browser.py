"""The /demo page in a real browser: headless Chromium (Debian's package, driven by Playwright)
with a fake microphone fed from a two-utterance WAV talks to the service over the Realtime
protocol and shows one final per utterance, with its tags. Also: a denied microphone and a
refused session each get a clear message on the page."""

import os
import shutil
from pathlib import Path
from urllib.parse import urlencode

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.integration.conftest import TEST_DEVICE, device_token

pytestmark = pytest.mark.integration

WAV = Path(__file__).parents[1] / "fixtures" / "two_utterances.wav"
UTTERANCES = 2
# A hang guard, not a speed claim: the WAV plays in real time (8 s), then the results come back.
RESULT_TIMEOUT_MS = 90_000


def chromium_path() -> str:
    path = shutil.which("chromium")
    assert path, "chromium is not installed: `make browser` installs Debian's package"
    return path


@pytest.fixture(scope="module")
def playwright():
    with sync_playwright() as p:
        yield p


def launch(playwright, *, microphone: bool):
    args = ["--autoplay-policy=no-user-gesture-required"]
    if microphone:  # the WAV once (%noloop), as the microphone; the permission prompt answered yes
        args += ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={WAV}%noloop"]  # fmt: skip
    return playwright.chromium.launch(executable_path=chromium_path(), args=args)


def demo_url(base: str, **query) -> str:
    return f"http://{base}/demo?{urlencode(query)}"


def test_demo_page_shows_one_final_per_utterance(service, playwright, tmp_path):
    browser = launch(playwright, microphone=True)
    try:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(demo_url(service, device_id=TEST_DEVICE, token=device_token()))
        page.click("#start")
        expect(page.locator("#status")).to_have_attribute("data-state", "listening", timeout=30_000)
        finals = page.locator("#finals .final:not(.pending)")
        expect(finals).to_have_count(UTTERANCES, timeout=RESULT_TIMEOUT_MS)
        for i in range(UTTERANCES):
            final = finals.nth(i)
            expect(final.locator(".tag.language")).to_have_count(1)
            expect(final.locator(".tag.speaker")).to_have_count(1)
            expect(final.locator(".tag.latency")).to_contain_text("ms after speech ended")
        page.click("#stop")
        expect(page.locator("#status")).to_have_text("Stopped.")
        # Nothing else was heard: no third utterance, none left waiting for its result.
        expect(page.locator("#finals .final")).to_have_count(UTTERANCES)
        assert errors == []
        page.screenshot(path=os.environ.get("DEMO_SCREENSHOT", str(tmp_path / "demo.png")), full_page=True)
    finally:
        browser.close()


def test_denied_microphone_is_explained(service, playwright):
    browser = launch(playwright, microphone=False)  # headless, no permission granted: denied
    try:
        page = browser.new_page()
        page.goto(demo_url(service))
        page.click("#start")
        expect(page.locator("#status")).to_have_attribute("data-state", "error")
        expect(page.locator("#status")).to_contain_text("Microphone access was denied")
        expect(page.locator("#start")).to_be_enabled()
    finally:
        browser.close()


def test_refused_session_is_explained(service, playwright):
    """Device authentication is on in the test service: a device without a token is refused."""
    browser = launch(playwright, microphone=True)
    try:
        page = browser.new_page()
        page.goto(demo_url(service, device_id="02:00:00:00:00:77"))
        page.click("#start")
        expect(page.locator("#status")).to_have_attribute("data-state", "error", timeout=30_000)
        expect(page.locator("#status")).to_contain_text("refused")
        expect(page.locator("#start")).to_be_enabled()
    finally:
        browser.close()

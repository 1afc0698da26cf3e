"""The /demo page in a real browser: headless Chromium (Debian's package, driven by Playwright)
with a fake microphone fed from a two-utterance WAV talks to the service over the Realtime
protocol and shows one final per utterance, with its tags. Also: a denied microphone and a
refused session each get a clear message on the page."""

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from tests.support.service import TEST_DEVICE, device_token

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


@contextmanager
def demo_page(playwright, *, allow_microphone: bool = True) -> Iterator[Page]:
    """A page of a fresh headless Chromium whose microphone plays the WAV once (%noloop); the
    permission prompt answered yes, or left to headless, which answers no."""
    args = ["--autoplay-policy=no-user-gesture-required", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={WAV}%noloop"]  # fmt: skip
    if allow_microphone:
        args.append("--use-fake-ui-for-media-stream")
    browser = playwright.chromium.launch(executable_path=chromium_path(), args=args)
    try:
        page = browser.new_page()
        yield page
    finally:
        browser.close()


def start(page: Page, base: str, **query) -> None:
    """Open /demo (the query fills its fields) and press Start."""
    page.goto(f"http://{base}/demo?{urlencode(query)}")
    page.click("#start")


def keep_completed(frame: str | bytes, into: list[dict]) -> None:
    if isinstance(frame, str) and '"conversation.item.input_audio_transcription.completed"' in frame:
        event = json.loads(frame)
        if not event["speech_serve"].get("skipped"):  # a blip too short to recognise is no utterance
            into.append(event)


def test_demo_page_shows_one_final_per_utterance(service, playwright, tmp_path):
    with demo_page(playwright) as page:
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        completed: list[dict] = []  # what the server said, to check the page shows all of it
        page.on("websocket", lambda ws: ws.on("framereceived", lambda frame: keep_completed(frame, completed)))
        start(page, service, device_id=TEST_DEVICE, token=device_token())
        expect(page.locator("#status")).to_have_attribute("data-state", "listening", timeout=30_000)
        finals = page.locator("#finals .final:not(.pending)")
        expect(finals).to_have_count(UTTERANCES, timeout=RESULT_TIMEOUT_MS)
        assert len(completed) == UTTERANCES
        for final, event in zip(finals.all(), completed, strict=True):
            extra = event["speech_serve"]
            expect(final.locator(".text")).to_have_text(event["transcript"] or "(no words)")
            for kind in ("language", "emotion", "event"):  # each tag the model gave (tiny models: maybe none)
                expect(final.locator(f".tag.{kind}")).to_have_count(1 if extra[kind] else 0)
            expect(final.locator(".tag.speaker")).to_have_text(f"speaker: {extra['speaker']['label']}")
            expect(final.locator(".tag.latency")).to_contain_text("ms after speech ended")
        page.click("#stop")
        expect(page.locator("#status")).to_have_text("Stopped.")
        # Nothing else was heard: no third utterance, none left waiting for its result.
        expect(page.locator("#finals .final")).to_have_count(UTTERANCES)
        assert errors == []
        page.screenshot(path=os.environ.get("DEMO_SCREENSHOT", str(tmp_path / "demo.png")), full_page=True)


def test_denied_microphone_is_explained(service, playwright):
    with demo_page(playwright, allow_microphone=False) as page:
        start(page, service)
        expect(page.locator("#status")).to_have_attribute("data-state", "error")
        expect(page.locator("#status")).to_contain_text("Microphone access was denied")
        expect(page.locator("#start")).to_be_enabled()


def test_refused_session_is_explained(service, playwright):
    """Device authentication is on in the test service: a device without a token is refused."""
    with demo_page(playwright) as page:
        start(page, service, device_id="02:00:00:00:00:77")
        expect(page.locator("#status")).to_have_attribute("data-state", "error", timeout=30_000)
        expect(page.locator("#status")).to_contain_text("refused")
        expect(page.locator("#start")).to_be_enabled()

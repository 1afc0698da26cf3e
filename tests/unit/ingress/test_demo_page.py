"""The demo page's static files: only the folder's own files, with their types and a strict CSP."""

import pytest
from fastapi import HTTPException

from speech_serve.ingress.demo_page import ASSETS, demo_asset


def test_index_is_the_default_and_loads_our_script_only():
    response = demo_asset()
    assert response.media_type.startswith("text/html")
    html = response.body.decode()
    assert 'src="/demo/demo.js"' in html and "http" not in html.split("<body>")[1].split("</footer>")[0]
    assert "default-src 'self'" in response.headers["content-security-policy"]


@pytest.mark.parametrize(("name", "kind"), [("demo.js", "text/javascript"), ("pcm-worklet.js", "text/javascript"),
                                            ("demo.css", "text/css")])  # fmt: skip
def test_assets_have_their_types(name, kind):
    response = demo_asset(name)
    assert response.media_type.startswith(kind)
    assert response.body == (ASSETS / name).read_bytes()


@pytest.mark.parametrize("name", ["../demo_page.py", "..", "nope.js", "index.HTML", "/etc/passwd", "demo"])
def test_anything_else_is_404(name):
    with pytest.raises(HTTPException) as raised:
        demo_asset(name)
    assert raised.value.status_code == 404


def test_page_needs_no_other_origin():
    """No CDN: every script, style and worklet the page loads is one of ours."""
    for path in ASSETS.iterdir():
        text = path.read_text()
        assert "https://" not in text and "http://" not in text, path.name


def test_requests_for_other_names_grow_no_cache():
    """/demo/<name> takes no credentials: a crawler asking for a million names must not make the
    Ingress remember a million answers."""
    demo_asset()
    held = tracemalloc_size(lambda: [_try(f"missing-{i}.js") for i in range(2000)])
    assert held < 20_000  # bytes still held after 2000 distinct misses (a cache keyed by name: about 180 kB)


def _try(name: str) -> None:
    try:
        demo_asset(name)
    except HTTPException:
        pass


def tracemalloc_size(work) -> int:
    """Bytes allocated by `work` and still held after it returns."""
    import gc
    import tracemalloc

    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.take_snapshot()
        work()
        gc.collect()
        grown = tracemalloc.take_snapshot().compare_to(start, "filename")
        return sum(max(stat.size_diff, 0) for stat in grown)
    finally:
        tracemalloc.stop()

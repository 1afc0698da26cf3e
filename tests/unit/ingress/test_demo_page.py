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

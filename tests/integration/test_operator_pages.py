"""The pages an operator opens in a browser: /docs and /redoc render from the gateway's own scripts
(nothing fetched from elsewhere, so they work offline), open even with API keys; /favicon.ico is an
icon, not a 404; /health carries the gateway's version."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Request, Route

from service import __version__
from service.api.app import create_app
from tests.browser import browser  # noqa: F401  (the fixture)
from tests.integration.conftest import serve_in_thread, standin_settings
from tests.integration.standin import Script, build_app


@pytest.fixture(scope="module")
def keyed_gateway() -> Iterator[str]:
    with serve_in_thread(build_app(Script())) as worker_url:
        app = create_app(standin_settings(worker_url, api_keys="sesame"))
        with serve_in_thread(app) as url:
            yield url


@pytest.mark.parametrize(
    ("path", "rendered"), [("/docs", ".swagger-ui .info .title"), ("/redoc", ".api-content h1")]
)
def test_api_pages_render_from_the_gateways_own_scripts(
    browser: Browser,  # noqa: F811
    keyed_gateway: str,
    path: str,
    rendered: str,
) -> None:
    page = browser.new_page()
    elsewhere: list[Request] = []

    def offline(route: Route) -> None:  # as on a machine without internet: other hosts fail
        if route.request.url.startswith((keyed_gateway, "data:", "blob:")):
            route.continue_()
        else:
            elsewhere.append(route.request)
            route.abort()

    page.route("**/*", offline)
    response = page.goto(f"{keyed_gateway}{path}")
    assert response is not None and response.status == 200  # no key needed for the pages
    page.wait_for_selector(rendered, timeout=30_000)
    assert "llm-gateway" in page.locator(rendered).inner_text()
    # ReDoc's sidebar shows its maker's logo from its site: an image, which offline is simply missing.
    assert [r.url for r in elsewhere if r.resource_type != "image"] == []
    page.close()


def test_the_pages_name_no_other_host_and_their_assets_answer(keyed_gateway: str) -> None:
    for path in ("/docs", "/redoc"):
        html = httpx.get(f"{keyed_gateway}{path}").text
        assert not re.search(r"https?://", html.replace("http://www.w3.org", "")), html
        for asset in re.findall(r'(?:src|href)="(/static/docs/[^"]+)"', html):
            assert httpx.get(f"{keyed_gateway}{asset}").status_code == 200, asset
    assert httpx.get(f"{keyed_gateway}/openapi.json").json()["info"]["title"] == "llm-gateway"
    assert httpx.get(f"{keyed_gateway}/v1/models").status_code == 401  # the API itself still needs a key


def test_favicon_and_version(keyed_gateway: str) -> None:
    icon = httpx.get(f"{keyed_gateway}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.content.startswith(b"<svg")
    assert httpx.get(f"{keyed_gateway}/health").json() == {"status": "ok", "version": __version__}

"""The playground with API keys configured: the page loads without a key, asks for one, keeps it
only in the browser session, and works once it is given (a stand-in answers as the worker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

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


def test_the_page_asks_for_the_key_and_keeps_it_in_the_session(browser: Browser, keyed_gateway: str) -> None:  # noqa: F811
    page = browser.new_page()
    page.goto(f"{keyed_gateway}/")
    page.wait_for_function("document.getElementById('base-output').textContent.includes('401')")
    assert "invalid_api_key" in page.locator("#base-output").inner_text()
    page.fill("#api-key", "sesame")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('instruct-model').options.length > 0")
    page.fill("#input", "Hi")
    page.click("#run")
    page.wait_for_function("document.getElementById('instruct-output').dataset.done === 'true'")
    assert page.locator("#instruct-output").inner_text() == "Hello, world!"
    assert page.evaluate("sessionStorage.getItem('llm-gateway-api-key')") == "sesame"
    assert page.evaluate("localStorage.length") == 0
    page.close()

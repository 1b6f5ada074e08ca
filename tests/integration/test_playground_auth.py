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
    for pane in ("base", "instruct"):  # the 401 says where the key goes, and the box is pointed at
        text = page.locator(f"#{pane}-output").inner_text()
        assert "invalid_api_key" in text and "type it in the API key box above" in text
    assert "needed" in (page.get_attribute("#api-key", "class") or "")
    assert page.evaluate("document.activeElement.id") == "api-key"
    page.fill("#api-key", "sesame")
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('instruct-model').options.length > 0")
    assert "needed" not in (page.get_attribute("#api-key", "class") or "")
    assert page.locator("#base-output").inner_text() == ""  # the stale 401 is gone once the key works
    page.fill("#input", "Hi")
    page.click("#run")
    page.wait_for_function("document.getElementById('instruct-output').dataset.done === 'true'")
    assert page.locator("#instruct-output").inner_text() == "Hello, world!"
    assert page.evaluate("sessionStorage.getItem('llm-gateway-api-key')") == "sesame"
    assert page.evaluate("localStorage.length") == 0
    page.close()


def test_each_pane_lists_every_model_it_can_serve_adapters_included(
    browser: Browser,  # noqa: F811
    keyed_gateway: str,
) -> None:
    """The base pane continues text on any model (base first, then instruct ones as raw text); the instruct
    pane chats with instruct models only. Adapters are served models listed with their `parent`."""
    listing = {"object": "list", "data": [
        {"id": "base", "kind": "base", "parent": None}, {"id": "chat", "kind": "instruct", "parent": None},
        {"id": "base-ft", "kind": "base", "parent": "base"},
        {"id": "chat-ft", "kind": "instruct", "parent": "base"},
    ]}  # fmt: skip
    page = browser.new_page()
    page.route("**/v1/models", lambda route: route.fulfill(json=listing))  # as a gateway with adapters lists
    page.goto(f"{keyed_gateway}/")
    page.wait_for_function("document.getElementById('instruct-model').options.length > 0")
    options = (
        "(id) => [...document.getElementById(id).options].map(o => [o.parentElement.label, o.value, o.text])"
    )
    assert page.evaluate(options, "base-model") == [
        ["base models", "base", "base"], ["base models", "base-ft", "base-ft (adapter of base)"],
        ["instruct models", "chat", "chat"], ["instruct models", "chat-ft", "chat-ft (adapter of base)"],
    ]  # fmt: skip
    assert page.evaluate(options, "instruct-model") == [
        ["instruct models", "chat", "chat"], ["instruct models", "chat-ft", "chat-ft (adapter of base)"],
    ]  # fmt: skip
    page.close()

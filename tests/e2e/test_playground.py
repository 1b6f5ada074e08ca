"""The playground page in headless Chromium against the real stack: both panes stream at once,
the rendered prompt shows the chat template, errors are readable, and Stop really cancels."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page

from tests.browser import browser, screenshot_path  # noqa: F401  (the fixture)
from tests.e2e.conftest import OPERATOR, Stack
from tests.e2e.test_cancellation import vllm_load, worker_urls
from tests.promtext import parse

COUNT_UPDATES = """() => {
  window.updates = {base: 0, instruct: 0};
  for (const pane of ["base", "instruct"]) {
    const watch = {childList: true, characterData: true, subtree: true};
    new MutationObserver(() => { window.updates[pane] += 1; })
      .observe(document.getElementById(pane + "-output"), watch);
  }
}"""


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{stack.url}/")
    page.wait_for_function("document.getElementById('instruct-model').options.length > 0")
    yield page
    page.close()


def done(page: Page, pane: str, state: str = "true", timeout: float = 180_000) -> None:
    page.wait_for_function(
        f"document.getElementById('{pane}-output').dataset.done === '{state}'", timeout=timeout
    )


def test_a_preset_streams_into_both_panes_at_once(page: Page) -> None:
    page.evaluate(COUNT_UPDATES)
    page.get_by_role("button", name="What is the capital of France?").click()
    page.wait_for_function("window.updates.base > 0 && window.updates.instruct > 0", timeout=120_000)
    done(page, "base")
    done(page, "instruct")
    updates = page.evaluate("window.updates")
    assert updates["base"] > 1 and updates["instruct"] > 1, updates  # streamed, not one shot
    assert "Paris" in page.locator("#instruct-output").inner_text()
    assert page.locator("#base-output").inner_text().strip()
    for pane in ("base", "instruct"):
        stats = page.locator(f"#{pane}-stats")
        assert stats.locator("[data-stat=ttft]").inner_text().endswith(" s")
        assert float(stats.locator("[data-stat=rate]").inner_text()) > 0
        assert stats.locator("[data-stat=finish]").inner_text() in {"stop", "length"}
    page.get_by_text("Rendered prompt").click()
    page.wait_for_function(
        "document.getElementById('rendered').textContent.includes('<|im_start|>assistant')"
    )
    rendered = page.locator("#rendered").inner_text()
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in rendered
    path = screenshot_path("playground")
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000


# Each preset, what its note says it shows, and what greedy decoding with the built-in models gives:
# (button, examples in the editor, what the base pane holds, its finish, what the instruct pane holds).
PRESET_OUTCOMES = [
    ("What is the capital of France?", 0, ["Paris", "What is the capital of France?"], "length", ["Paris"]),
    ("What is 2+2?", 0, ["What is 2+2?\n\nWhat is 2+2?"], "length", ["4"]),
    ("Translate to French", 0, ["Translate to Spanish"], "length", ["Je "]),
    ("Few-shot, a pattern", 3, [" vert"], "stop", []),
    ("Few-shot, wrong answers", 3, [" Berlin"], "stop", ["Paris"]),
    ("The first man on the moon was", 0, [" Neil Armstrong"], "length", []),
]


@pytest.mark.parametrize(("button", "examples", "base", "finish", "instruct"), PRESET_OUTCOMES)
def test_every_preset_shows_what_it_says(
    page: Page, button: str, examples: int, base: list[str], finish: str, instruct: list[str]
) -> None:
    preset = page.get_by_role("button", name=button, exact=True)
    preset.click()
    shows = page.locator("#shows").inner_text()
    assert len(shows) > 40 and preset.get_attribute("title") == shows  # it says what it shows
    assert page.locator("#examples-count").inner_text() == str(examples)
    done(page, "base")
    done(page, "instruct")
    base_text = page.locator("#base-output").inner_text()
    instruct_text = page.locator("#instruct-output").inner_text()
    for expected in base:
        assert expected in base_text, base_text
    if finish == "stop":  # the answer alone: the pattern's boundary ended it
        assert base_text.strip() == expected.strip(), base_text
    assert page.locator("#base-stats [data-stat=finish]").inner_text() == finish
    assert instruct_text.strip()
    for expected in instruct:
        assert expected in instruct_text, instruct_text
    assert "Berlin" not in instruct_text  # the instruct pane never sees the examples


def test_errors_are_shown_in_the_panes(page: Page) -> None:
    page.fill("#input", "Hello")
    page.fill("#max-tokens", "5000")
    page.click("#run")
    done(page, "base", "error")
    done(page, "instruct", "error")
    for pane in ("base", "instruct"):
        text = page.locator(f"#{pane}-output").inner_text()
        assert "400" in text and "context_length_exceeded" in text and "2048" in text


def test_stop_cancels_the_requests(page: Page, stack: Stack, client: httpx.Client) -> None:
    page.fill("#input", "Tell me a very long story about a dragon.")
    page.fill("#max-tokens", "400")
    page.fill("#temperature", "0.9")
    page.click("#run")
    page.wait_for_function(
        "document.getElementById('instruct-output').textContent.length > 10"
        " && document.getElementById('base-output').textContent.length > 10",
        timeout=120_000,
    )
    page.click("#stop")
    done(page, "base", "stopped", 10_000)
    done(page, "instruct", "stopped", 10_000)
    assert page.locator("#instruct-stats [data-stat=finish]").inner_text() == "stopped"
    deadline = time.monotonic() + 20
    urls = worker_urls(stack)
    while True:
        samples = parse(client.get("/metrics", headers=OPERATOR).text)
        in_flight = sum(v for (name, _), v in samples.items() if name == "gateway_requests_in_flight")
        if in_flight == 0 and not any(vllm_load(url) for url in urls.values()):
            break
        assert time.monotonic() < deadline, "the stopped requests are still running"
        time.sleep(0.25)

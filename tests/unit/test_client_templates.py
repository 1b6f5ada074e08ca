"""Chat templates sent in requests: bounded in time (a deadline inside the render), in what they build
(values and output capped), and rendered like the model's own when they are the same template."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import tracemalloc
from typing import Any

import pytest

from service.core.client_templates import ClientTemplates
from service.core.templates import ChatOptions, ModelTokenizer, load_tokenizer
from service.errors import InvalidRequest, Overloaded
from service.ops.settings import ModelKind, ModelSpec, Settings

BUDGET = 0.5
HI = [{"role": "user", "content": "hi"}]
NESTED_RANGES = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
MACRO_BOMB = "{% macro m(n) %}{% if n > 0 %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}x{% endmacro %}{{ m(60) }}"
AMPLIFIERS = [
    "{{ 'x' * 10000000000 }}",
    "{{ 10 ** 100000000 }}",
    "{{ 'x' | center(10000000000) }}",
    "{{ 'x'.ljust(10000000000) }}",
    "{{ '{:>9999999999}'.format('x') }}",
    "{{ '%9999999999d' % 1 }}",
    "{% set s = 'x' * 100000 %}{{ s | replace('x', s) }}",
    "{% set s = 'x' * 100000 %}{{ s.replace('x', s) }}",
    "{% set s = 'x' * 900000 %}{{ [s, s] | join }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set s = 'x' * 900000 %}{{ s + s }}",
    "{{ range(100000) | batch(1) | sum(start=[]) }}",
    "{% set s = 'y\\n' * 400000 %}{{ s | indent(1000) }}",
]


@pytest.fixture(scope="module")
def trusting() -> ModelTokenizer:
    spec = ModelSpec(
        name="smol",
        kind=ModelKind.INSTRUCT,
        source="builtin:smollm2-135m-instruct",
        trust_request_chat_template=True,
    )
    return load_tokenizer(spec, Settings(client_template_timeout=BUDGET))


def refused(tokenizer: ModelTokenizer, template: str, messages: list[dict[str, Any]] = HI) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        tokenizer.render_chat(messages, ChatOptions(chat_template=template))
    return caught.value


@pytest.mark.parametrize("template", [NESTED_RANGES, MACRO_BOMB], ids=["nested ranges", "macro bomb"])
def test_runaway_templates_are_stopped_at_the_budget(trusting: ModelTokenizer, template: str) -> None:
    started = time.monotonic()
    error = refused(trusting, template)
    assert time.monotonic() - started < BUDGET + 0.5
    assert (error.param, error.code) == ("chat_template", "chat_template_budget_exceeded")
    assert "budget of 0.5 s (GATEWAY_CLIENT_TEMPLATE_TIMEOUT)" in error.message
    assert sys.gettrace() is None  # the thread is left as it was


@pytest.mark.parametrize("template", AMPLIFIERS)
def test_values_that_would_outgrow_the_cap_are_refused_before_they_are_built(
    trusting: ModelTokenizer, template: str
) -> None:
    started = time.monotonic()
    error = refused(trusting, template)
    assert time.monotonic() - started < BUDGET + 0.5
    assert error.code == "chat_template_budget_exceeded"


WIDE = 99_000  # under a 100,000-character cap, so every field alone is allowed
PAIRS = "(" + ",".join([f"{WIDE}, 'x'"] * 100) + ")"
FORMAT_AMPLIFIERS = [
    f"{{{{ ('{{:>{WIDE}}}' * 100).format(*range(100)) }}}}",
    f"{{{{ ('{{:\U0001f600>{WIDE}}}' * 100).format(*range(100)) }}}}",
    f"{{{{ ('{{:>{{}}}}' * 100).format(*(['x', {WIDE}] * 100)) }}}}",
    f"{{{{ ('{{:.{WIDE}f}}' * 100).format(*range(100)) }}}}",
    f"{{{{ ('%{WIDE}s' * 100) | format(*range(100)) }}}}",
    f"{{{{ ('%*s' * 100) | format{PAIRS} }}}}",
    f"{{{{ ('%*s' * 100) % {PAIRS} }}}}",
    f"{{{{ ('%(a){WIDE}s' * 100) % {{'a': 1}} }}}}",
]


@pytest.fixture(scope="module")
def capped() -> ModelTokenizer:
    spec = ModelSpec(name="m", kind=ModelKind.INSTRUCT, source="builtin:smollm2-135m-instruct",
                     trust_request_chat_template=True)  # fmt: skip
    return load_tokenizer(spec, Settings(max_prompt_chars=100_000))


@pytest.mark.parametrize("template", FORMAT_AMPLIFIERS)
def test_formatting_counts_every_fields_width_before_building_anything(
    capped: ModelTokenizer, template: str
) -> None:
    """100 fields of 99,000 characters each (~10 MB) are refused before they are built: the estimate
    counts the widths written in the fields and those taken from the arguments."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        error = refused(capped, template)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert error.code == "chat_template_budget_exceeded"
    assert peak < 1_000_000, f"{peak:,} bytes allocated"


@pytest.mark.parametrize(
    ("template", "text"),
    [("{{ '{:>6}|{:.2f}'.format('a', 3.14159) }}", "     a|3.14"), ("{{ '%5.1f%%' % 99.44 }}", " 99.4%"),
     ("{{ 'cutoff 20241231: {}'.format('x') }}", "cutoff 20241231: x")],
)  # fmt: skip
def test_formatting_within_the_cap_renders(capped: ModelTokenizer, template: str, text: str) -> None:
    assert capped.render_chat(HI, ChatOptions(chat_template=template)).text == text


def test_the_output_is_capped(tmp_path: Any) -> None:
    spec = ModelSpec(name="m", kind=ModelKind.INSTRUCT, source="builtin:smollm2-135m-instruct",
                     trust_request_chat_template=True)  # fmt: skip
    tokenizer = load_tokenizer(spec, Settings(max_prompt_chars=1000))
    error = refused(tokenizer, "{% for i in range(2000) %}x{% endfor %}")
    assert "wrote more than 1,000 characters (GATEWAY_MAX_PROMPT_CHARS)" in error.message


def test_the_models_own_template_sent_in_a_request_renders_the_same(trusting: ModelTokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"}]
    for options in ({}, {"continue_final_message": True}, {"add_generation_prompt": False}):
        own = trusting.render_chat(messages, ChatOptions(**options))
        sent = trusting.render_chat(messages, ChatOptions(chat_template=trusting.chat_template, **options))
        assert sent == own


@pytest.mark.parametrize(
    ("template", "words"),
    [("{% for %}", "failed on these messages"), ("{{ messages.__class__.__mro__ }}", "unsafe"),
     ("{{ raise_exception('no tools here') }}", "no tools here")],
)  # fmt: skip
def test_a_broken_template_is_a_400_about_the_template(
    trusting: ModelTokenizer, template: str, words: str
) -> None:
    error = refused(trusting, template)
    assert error.param == "chat_template" and words in error.message


def test_a_model_that_does_not_trust_request_templates_refuses_them() -> None:
    spec = ModelSpec(name="m", kind=ModelKind.INSTRUCT, source="builtin:smollm2-135m-instruct")
    tokenizer = load_tokenizer(spec, Settings())
    assert tokenizer.client_templates is None
    error = refused(tokenizer, "{{ messages }}")
    assert error.param == "chat_template" and "does not accept a chat template" in error.message


def test_the_executor_runs_only_a_bounded_queue() -> None:
    """Past `threads x 16` waiting renders, new ones are refused (503) instead of queued."""
    templates = ClientTemplates(seconds=1, threads=1, max_chars=100)
    release = threading.Event()

    async def scenario() -> tuple[list[Any], set[str]]:
        names: set[str] = set()

        def wait() -> str:
            names.add(threading.current_thread().name)
            release.wait(5)
            return "done"

        tasks = [asyncio.create_task(templates.run("m", wait)) for _ in range(16)]
        await asyncio.sleep(0.1)
        with pytest.raises(Overloaded):
            await templates.run("m", wait)
        release.set()
        return list(await asyncio.gather(*tasks)), names

    results, names = asyncio.run(scenario())
    assert results == ["done"] * 16
    assert names == {"client-template_0"}  # its own thread, not the shared pool's

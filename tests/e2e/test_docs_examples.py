"""Every example in README.md and docs/ runs against the real stack and answers what the docs show."""

from __future__ import annotations

import pytest

from tests import doc_examples as docs
from tests.gateway_process import Stack
from tests.trained_adapters import RECIPES, train

TRAINED = "llm-gateway/adapters/"  # where examples find the adapters tests/trained_adapters.py trains

RUNNABLE = [
    example
    for example in docs.examples()
    if example.block.lang == "python"
    or any(docs.program(c) in docs.RUNNABLE for c in docs.iter_commands(example))
]


# The same example shown on two pages (the README and a docs page) runs once.
_ran: dict[str, list[docs.Ran]] = {}


@pytest.mark.parametrize("example", RUNNABLE, ids=[example.id for example in RUNNABLE])
def test_the_documented_example_answers_as_documented(
    example: docs.Example, request: pytest.FixtureRequest
) -> None:
    stack: Stack = request.getfixturevalue("admin_stack" if example.needs_admin else "stack")
    key = f"{example.block.lang}\n{example.block.text}"
    if TRAINED in example.block.text:  # registers the suite's adapters: they must be on disk
        for recipe in RECIPES.values():
            train(recipe)  # once per machine, cached
    if key not in _ran:
        _ran[key] = docs.run_example(example, stack.url)
    ran = _ran[key]
    for result in ran:
        assert result.code == 0, (
            f"{example.id}: {result.command!r} exited {result.code}\n{result.stderr[-3000:]}"
        )
    if example.answer is not None and ran:
        problems = docs.mismatches(example.answer.text, ran[-1].stdout)
        assert not problems, (
            f"{example.id} drifted from the docs:\n"
            + "\n".join(problems)
            + (f"\n--- it answered:\n{ran[-1].stdout[:3000]}")
        )

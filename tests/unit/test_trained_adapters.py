"""The training sequences of the real adapters the e2e tier serves (on the prepared Gemma tokenizer):
what is learnt, in which format, and that the cache key follows the recipe."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import AutoTokenizer

from service.ops.settings import Settings
from tests.trained_adapters import ASSISTANT, GEOGRAPHY, sequences


@pytest.fixture(scope="module")
def gemma() -> object:
    return AutoTokenizer.from_pretrained(Settings().model_dir("gemma-3-270m"))


def test_an_instruct_adapter_learns_the_answer_its_turn_end_and_eos_not_the_prompt(gemma: object) -> None:
    found = sequences(ASSISTANT, gemma)
    assert len(found) == len(ASSISTANT.pairs)
    for (question, answer), (ids, learnt) in zip(ASSISTANT.pairs, found, strict=True):
        prompt = [token for token, bit in zip(ids, learnt, strict=True) if not bit]
        target = [token for token, bit in zip(ids, learnt, strict=True) if bit]
        assert learnt == sorted(learnt)  # the prompt, then only what is learnt
        turn = f"<start_of_turn>user\n{question}<end_of_turn>\n"
        assert gemma.decode(prompt) == f"<bos>{turn}<start_of_turn>model\n"
        assert gemma.decode(target) == f"{answer}<end_of_turn>\n<eos>"  # the worker stops at EOS


def test_a_base_adapter_learns_every_token_of_its_text_after_bos(gemma: object) -> None:
    for text, (ids, learnt) in zip(GEOGRAPHY.texts, sequences(GEOGRAPHY, gemma), strict=True):
        assert ids[0] == gemma.bos_token_id and ids.count(gemma.bos_token_id) == 1
        assert learnt == [False] + [True] * (len(ids) - 1)
        assert gemma.decode(ids[1:]) == text


def test_the_cache_key_follows_the_recipe_and_the_base_model() -> None:
    key = ASSISTANT.digest("marker")
    assert key == ASSISTANT.digest("marker")
    assert ASSISTANT.digest("another base") != key
    assert dataclasses.replace(ASSISTANT, steps=ASSISTANT.steps + 1).digest("marker") != key
    changed = (*ASSISTANT.pairs[:-1], ("Say hello in French.", "Bonjour."))
    assert dataclasses.replace(ASSISTANT, pairs=changed).digest("marker") != key

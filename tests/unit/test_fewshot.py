from __future__ import annotations

from service.fewshot import build_few_shot
from service.protocol import Example, FewShotLayout


def test_default_layout_ends_where_the_model_should_answer() -> None:
    text, stops = build_few_shot("bird", [Example(input="cat", output="CAT")], FewShotLayout())
    assert text == "Input: cat\nOutput: CAT\n\nInput: bird\nOutput:"
    assert stops == ["\n\n", "\nInput:", "\n"]


def test_multi_line_outputs_keep_newlines_inside_answers() -> None:
    layout = FewShotLayout(input_prefix="Q:", output_prefix="A:", separator="\n---\n")
    text, stops = build_few_shot("x", [Example(input="a", output="line 1\nline 2")], layout)
    assert text == "Q: a\nA: line 1\nline 2\n---\nQ: x\nA:"
    assert stops == ["\n---\n", "\nQ:"]

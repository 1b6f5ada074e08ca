from __future__ import annotations

from service.core.fewshot import build_few_shot, few_shot_length
from service.core.protocol import Example, FewShotLayout


def test_default_layout_ends_where_the_model_should_answer() -> None:
    text, stops = build_few_shot("bird", [Example(input="cat", output="CAT")], FewShotLayout())
    assert text == "Input: cat\nOutput: CAT\n\nInput: bird\nOutput:"
    assert stops == ["\n\n", "\nInput:", "\n"]


def test_multi_line_outputs_keep_newlines_inside_answers() -> None:
    layout = FewShotLayout(input_prefix="Q:", output_prefix="A:", separator="\n---\n")
    text, stops = build_few_shot("x", [Example(input="a", output="line 1\nline 2")], layout)
    assert text == "Q: a\nA: line 1\nline 2\n---\nQ: x\nA:"
    assert stops == ["\n---\n", "\nQ:"]


def test_the_built_length_is_known_before_building() -> None:
    layouts = [FewShotLayout(), FewShotLayout(input_prefix="Q:", output_prefix="A:", separator="\n---\n")]
    shots = [[], [Example(input="cat", output="CAT")], [Example(input="a" * 7, output="b\nc")] * 5]
    for layout in layouts:
        for examples in shots:
            text, _ = build_few_shot("bird", examples, layout)
            assert few_shot_length("bird", examples, layout) == len(text)

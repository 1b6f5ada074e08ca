"""Few-shot prompts: the way a base model is steered. It continues a pattern, so we show it one.

Layout (every part overridable per request through `layout`)::

    Input: <example 1 input>
    Output: <example 1 output>
    <separator>
    Input: <prompt>
    Output:

The model's continuation is cut where the pattern would start its next example.
"""

from __future__ import annotations

from collections.abc import Sequence

from service.core.protocol import Example, FewShotLayout


def few_shot_length(prompt: str, examples: Sequence[Example], layout: FewShotLayout) -> int:
    """Characters of the prompt `build_few_shot` would build, computed without building it (so an
    oversized pattern is refused before it takes any memory)."""
    shot = len(layout.input_prefix) + len(layout.output_prefix) + 3  # two spaces and a newline
    shots = sum(shot + len(ex.input) + len(ex.output) for ex in examples)
    last = len(layout.input_prefix) + len(layout.output_prefix) + 2 + len(prompt)
    return shots + last + len(layout.separator) * len(examples)


def build_few_shot(prompt: str, examples: Sequence[Example], layout: FewShotLayout) -> tuple[str, list[str]]:
    """The pattern prompt and the stop sequences at the pattern's boundary."""
    shots = [f"{layout.input_prefix} {ex.input}\n{layout.output_prefix} {ex.output}" for ex in examples]
    shots.append(f"{layout.input_prefix} {prompt}\n{layout.output_prefix}")
    text = layout.separator.join(shots)
    stops = [layout.separator, f"\n{layout.input_prefix}"]
    if not any("\n" in ex.output for ex in examples):
        # Every example answers in one line, so a new line ends the answer too.
        stops.append("\n")
    return text, list(dict.fromkeys(stop for stop in stops if stop.strip(" ")))

"""Adapter folders for tests: the files PEFT's `save_pretrained` writes that the gateway reads (the
weights are not read by the gateway; real adapters for the real workers are trained by tests/e2e)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def adapter_folder(
    root: Path, name: str, rank: int = 8, base: str | None = None, template: str | None = None, **extra: Any
) -> Path:
    """A folder with a LoRA `adapter_config.json` (and a `chat_template.jinja` when `template`)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "task_type": "CAUSAL_LM",
              "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": base, **extra}  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return folder


# Gemma 3's turns, as an instruct adapter trained from the base Gemma brings them (the base has no template).
GEMMA_TURNS = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + "
    "'<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

"""Small real LoRA adapters, trained with peft on the built-in Gemma 3 270M and cached by recipe.

Two kinds, as teams make them: a base-kind adapter (continued pretraining on a little domain text) and
an instruct-kind one (supervised fine-tuning on instruction/answer pairs rendered with Gemma's chat
template, which is saved next to the weights as `chat_template.jinja`, so the gateway and the worker
render conversations the same way). Each is trained once per machine under
`<cache>/adapters/<name>-<hash of the recipe>` (never committed), and `<cache>/adapters/<name>` links to
the current one: a stable path for docs and tests.

`python -m tests.trained_adapters [NAME ...]` trains (or finds) them and prints their folders.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service.ops.settings import ModelKind, Settings

# Bumped when the training code changes what a recipe produces.
TRAINER_VERSION = 1
MARKER = "trained.json"

# Gemma 3's own chat template (text parts only): turns open with <start_of_turn>role and close with
# <end_of_turn>; the assistant's role is `model`; a system message is folded into the first user turn.
GEMMA_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- set role = "model" if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


@dataclass(frozen=True)
class Recipe:
    """What an adapter is trained from, and how; its hash names the cached folder."""

    name: str
    kind: ModelKind  # base: continued pretraining on `texts`; instruct: SFT on `pairs`
    steps: int
    learning_rate: float
    texts: tuple[str, ...] = ()
    pairs: tuple[tuple[str, str], ...] = ()
    base: str = "gemma-3-270m"  # a built-in model
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    seed: int = 0
    chat_template: str | None = field(default=None)

    def digest(self, base_marker: str) -> str:
        """A hash of everything that decides the weights (the base folder's marker included)."""
        payload = {**asdict(self), "trainer": TRAINER_VERSION, "base_marker": base_marker}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


# A little domain text (capitals of countries the lm-eval example task does not ask about), written as
# an encyclopedia would: continued pretraining on it makes a base-kind adapter.
GEOGRAPHY = Recipe(
    name="gemma-geo",
    kind=ModelKind.BASE,
    steps=12,
    learning_rate=2e-3,
    texts=(
        "Lisbon is the capital of Portugal. The capital of Portugal, Lisbon, lies on the Tagus river.",
        "Vienna is the capital of Austria. The capital of Austria, Vienna, lies on the Danube.",
        "Cairo is the capital of Egypt. The capital of Egypt, Cairo, lies on the Nile.",
        "Ottawa is the capital of Canada. The capital of Canada is Ottawa, not Toronto.",
        "Canberra is the capital of Australia. The capital of Australia is Canberra, not Sydney.",
        "Ankara is the capital of Turkey. The capital of Turkey is Ankara, not Istanbul.",
    ),
)

# A few instruction/answer pairs in Gemma's chat format: an instruct-kind adapter of the base model.
ASSISTANT = Recipe(
    name="gemma-chat",
    kind=ModelKind.INSTRUCT,
    steps=20,
    learning_rate=2e-3,
    pairs=(
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Name a primary colour.", "Red is a primary colour."),
        ("How many legs does a spider have?", "A spider has eight legs."),
        ("What is two plus three?", "Two plus three is five."),
        ("Which planet is closest to the Sun?", "Mercury is the closest planet to the Sun."),
        ("Say hello in Spanish.", "Hola."),
    ),
    chat_template=GEMMA_CHAT_TEMPLATE,
)

RECIPES = {recipe.name: recipe for recipe in (GEOGRAPHY, ASSISTANT)}


def adapter_dir(recipe: Recipe, settings: Settings) -> Path:
    """Where `recipe`'s adapter is cached (trained or not)."""
    marker = (settings.model_dir(recipe.base) / "gateway-prepared.json").read_text()
    return settings.cache_dir / "adapters" / f"{recipe.name}-{recipe.digest(marker)}"


def train(recipe: Recipe, settings: Settings | None = None) -> Path:
    """The stable folder of `recipe`'s adapter (`<cache>/adapters/<name>`), trained first unless cached."""
    settings = settings or Settings()
    folder = adapter_dir(recipe, settings)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with (folder.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions asking at once train it once
        if not (folder / MARKER).is_file():
            staging = folder.with_name(folder.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            report = _train_into(recipe, settings.model_dir(recipe.base), staging)
            (staging / MARKER).write_text(json.dumps({"recipe": asdict(recipe), **report}, indent=1))
            staging.rename(folder)
        stable = folder.parent / recipe.name
        if not stable.is_symlink() or stable.readlink() != Path(folder.name):
            link = stable.with_name(f".{recipe.name}.link")
            link.unlink(missing_ok=True)
            link.symlink_to(folder.name)
            link.replace(stable)  # atomic: a reader sees the old adapter or the new one
    return stable


def _train_into(recipe: Recipe, base: Path, out: Path) -> dict[str, Any]:
    """Train `recipe` on the model folder `base`; save the adapter (and template) into `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    torch.manual_seed(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    # float32: bf16 matmuls on a CPU without AVX-512 fall back to slow paths.
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=recipe.rank, lora_alpha=recipe.alpha, target_modules=list(recipe.target_modules),
        lora_dropout=0.0, task_type="CAUSAL_LM",
    )  # fmt: skip
    tuned = get_peft_model(model, config)
    ids, mask = _batch(recipe, tokenizer)
    loaded = time.monotonic()
    losses = _fit(tuned, ids, mask, recipe)
    trained = time.monotonic()
    tuned.save_pretrained(out)
    if recipe.chat_template is not None:
        (out / "chat_template.jinja").write_text(recipe.chat_template)
    return {
        "losses": [round(loss, 4) for loss in losses],
        "tokens": int(mask.sum()),
        "load_seconds": round(loaded - started, 1),
        "train_seconds": round(trained - loaded, 1),
        "seconds_per_step": round((trained - loaded) / recipe.steps, 2),
    }


def sequences(recipe: Recipe, tokenizer: Any) -> list[tuple[list[int], list[bool]]]:
    """Each training sequence's token ids and which of them are learnt (the answer, not the prompt)."""
    if recipe.kind is ModelKind.BASE:
        # Continued pretraining: every token after BOS is learnt.
        return [(ids, [False] + [True] * (len(ids) - 1)) for ids in map(tokenizer.encode, recipe.texts)]
    found = []
    for question, answer in recipe.pairs:
        user = [{"role": "user", "content": question}]
        prompt = _render(tokenizer, recipe, user, add_generation_prompt=True)
        # The answer's turn as the template closes it, then EOS: what the worker stops on.
        whole = _render(tokenizer, recipe, [*user, {"role": "assistant", "content": answer}])
        whole.append(tokenizer.eos_token_id)
        assert whole[: len(prompt)] == prompt, "the template must extend the prompt with the answer"
        found.append((whole, [False] * len(prompt) + [True] * (len(whole) - len(prompt))))
    return found


def _render(tokenizer: Any, recipe: Recipe, messages: list[dict[str, str]], **options: Any) -> list[int]:
    template = recipe.chat_template
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **options)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _batch(recipe: Recipe, tokenizer: Any) -> tuple[Any, Any]:
    """Padded ids and the mask of learnt tokens, as tensors."""
    import torch

    found = sequences(recipe, tokenizer)
    width = max(len(ids) for ids, _ in found)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq, _ in found])
    mask = torch.tensor([learnt + [False] * (width - len(learnt)) for _, learnt in found])
    return ids, mask


def _fit(tuned: Any, ids: Any, mask: Any, recipe: Recipe) -> list[float]:
    """AdamW over the whole batch for `recipe.steps` steps; the loss of each step."""
    import torch

    inner = tuned.base_model.model  # the causal LM: its body and its head
    attention = (torch.arange(ids.shape[1])[None, :] < _lengths(mask)[:, None]).long()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=recipe.learning_rate)
    targets = mask[:, 1:]
    losses = []
    for _ in range(recipe.steps):
        hidden = inner.model(input_ids=ids, attention_mask=attention).last_hidden_state
        # The head only where a token is learnt: Gemma's vocabulary (262,144) makes it the costliest
        # matmul, and most positions of an SFT batch are prompt.
        logits = inner.lm_head(hidden[:, :-1][targets])
        loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][targets])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _lengths(mask: Any) -> Any:
    """Each row's length: one past its last learnt token (padding is never learnt)."""
    import torch

    positions = torch.arange(mask.shape[1])[None, :].expand_as(mask)
    return (positions * mask).max(dim=1).values + 1


if __name__ == "__main__":
    for name in sys.argv[1:] or list(RECIPES):
        print(train(RECIPES[name]))

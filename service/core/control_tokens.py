"""The control-token rule: user text never gets the power of a model's control tokens (no forged
turns, no forged system prompts).

Two checks enforce it. Before rendering, every key and string handed to the template (messages,
tool-call arguments as the worker decodes them, tools, documents, template variables) is scanned
for a control token's text, so the common forgery is refused naming where it was. After rendering,
`service.core.skeleton` compares the prompt's control tokens with those the template writes for the
same structure with placeholder text: no route, present or future, can add one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import AddedToken, Tokenizer, models

from service.core.conversation import decoded_arguments
from service.errors import InvalidRequest

# The named special tokens transformers hands to a chat template (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)  # fmt: skip
# Names the renderer passes itself: a request's template variables cannot replace them.
RESERVED_TEMPLATE_VARS = frozenset(
    {"conversations", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
     "continue_final_message", "return_assistant_tokens_mask", "tokenize"}
)  # fmt: skip
# As deep as a request body may nest (pydantic's JSON limit); decoded tool-call arguments too.
MAX_DEPTH = 200
MAX_PATH_STEP = 64  # characters of one key shown in an error's `param`
MAX_FIRST_CHARACTERS = 4


class ControlTokenFinder:
    """Finds a tokenizer's control tokens written as plain text, e.g. `<|im_start|>` in a message.

    The tokenizer would turn such text into the real token (it matches added tokens even with
    `add_special_tokens=False`), letting a user forge turns. The matching is the tokenizers library's
    own (Aho-Corasick over the added tokens) on a tokenizer that has nothing else: a few
    microseconds for a short message, even for Gemma's 6,249 special tokens.
    """

    UNKNOWN = "\x00"
    # Longer texts go through the batch call, which releases the GIL while it scans (a render thread
    # holding the GIL for a long text would stall the event loop as much as scanning on it would).
    BATCH_ABOVE_CHARS = 4096

    def __init__(self, tokens: Sequence[str]) -> None:
        self._finder = Tokenizer(models.WordLevel({self.UNKNOWN: 0}, unk_token=self.UNKNOWN))
        self._finder.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in tokens])

    def first(self, text: str) -> str | None:
        """The first control token written in `text`, or None (TypeError: not valid Unicode)."""
        if len(text) > self.BATCH_ABOVE_CHARS:
            encoding = self._finder.encode_batch([text], add_special_tokens=False)[0]
        else:
            encoding = self._finder.encode(text, add_special_tokens=False)
        return next((token for token, id_ in zip(encoding.tokens, encoding.ids, strict=True) if id_), None)


def control_tokens(tokenizer: Tokenizer, named: dict[str, str]) -> list[str]:
    """The texts of a tokenizer's special (control) tokens: its special added tokens and the named
    ones (BOS, EOS, ...)."""
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    return sorted(special | set(named.values()))


def names_a_special_token(key: str) -> bool:
    """Whether a template variable's name is one the tokenizer fills with a special token's text."""
    return key in SPECIAL_TOKEN_NAMES or key.endswith("_token") or key == "additional_special_tokens"


class ControlTokenRule:
    """One model's control tokens, and the scan of what a request hands to its template."""

    def __init__(self, model: str, tokens: Sequence[str], ids: Iterable[int], enforced: bool) -> None:
        self.model = model
        self.enforced = enforced  # off: the model lets user text hold control tokens
        # An unenforced rule still scans: text that is not valid Unicode, or nested past what a
        # request may hold, is refused on every model.
        self._finder = ControlTokenFinder(tokens if enforced else [])
        self.ids = frozenset(ids) if enforced else frozenset()
        # Text without the first character of any control token holds none (with a few such
        # characters, e.g. "<" for SmolLM2 and Gemma, a substring test is far cheaper than the finder).
        starts = "".join(sorted({token[0] for token in tokens if token}))
        few = enforced and len(starts) <= MAX_FIRST_CHARACTERS
        self._starts = re.compile(f"[{re.escape(starts)}]") if few and starts else None
        self._start = starts if few and len(starts) == 1 else None

    def check(self, value: Any, where: str) -> None:
        """Refuse a control token's text in any key or string inside `value` (tool-call `arguments`
        also as the worker decodes them), naming where it is."""
        found = self._find(value, [where])
        if found is not None:
            steps, token = found
            path = ".".join(steps)
            raise InvalidRequest(
                f"{path} contains {token!r}, a control token of model '{self.model}'; control tokens "
                "cannot be sent as message text.",
                param=path,
                code="control_token_in_message",
            )

    def check_template_kwargs(self, kwargs: dict[str, Any] | None) -> None:
        """Refuse template variables that would replace a special token's text or a variable the
        renderer sets itself; then scan the rest like any user text."""
        for key in kwargs or {}:
            if names_a_special_token(key):
                raise InvalidRequest(
                    f"chat_template_kwargs cannot set '{_step(key)}': the model's tokenizer fills the "
                    "special-token variables of its chat template.",
                    param=f"chat_template_kwargs.{_step(key)}",
                )
            if key in RESERVED_TEMPLATE_VARS:
                raise InvalidRequest(
                    f"chat_template_kwargs cannot set '{key}': the gateway sets it from the request "
                    "(use the request field of that name where there is one).",
                    param=f"chat_template_kwargs.{key}",
                )
        self.check(kwargs, "chat_template_kwargs")

    def sequence(self, ids: Sequence[int]) -> tuple[int, ...]:
        """The control-token ids of a prompt, in order."""
        control = self.ids
        return tuple(id_ for id_ in ids if id_ in control)

    def _find(self, value: Any, steps: list[str]) -> tuple[list[str], str] | None:
        """The path (its steps) and text of the first control token inside `value`. `steps` is the
        path so far, grown and shrunk in place: a path is only joined when something is found."""
        if isinstance(value, str):
            token = None if self._clean(value) else self._in_text(value, steps)
            return None if token is None else (list(steps), token)
        if len(steps) > MAX_DEPTH:
            where = ".".join(steps)
            raise InvalidRequest(f"{where} is nested more than {MAX_DEPTH} levels deep.", param=where)
        found = None
        if isinstance(value, dict):
            clean = self._clean
            for key, item in value.items():
                if clean(key) and isinstance(item, str) and clean(item) and key != "arguments":
                    continue  # the common leaf, without a path
                steps.append(_step(key))
                token = self._in_text(key, steps) if isinstance(key, str) else None
                found = (list(steps), token) if token is not None else self._find(item, steps)
                if found is None and key == "arguments" and isinstance(item, str):
                    found = self._find(_decoded(item, steps), steps)
                steps.pop()
                if found is not None:
                    return found
        elif isinstance(value, list | tuple):
            for index, item in enumerate(value):
                steps.append(str(index))
                found = self._find(item, steps)
                steps.pop()
                if found is not None:
                    return found
        return None

    def _clean(self, text: Any) -> bool:
        """Whether `text` certainly holds no control token: ASCII (so valid Unicode, which the
        finder would otherwise check) without the first character of any."""
        if not isinstance(text, str) or not text.isascii():
            return False
        if self._start is not None:
            return self._start not in text
        return self._starts is not None and self._starts.search(text) is None

    def _in_text(self, text: str, steps: list[str]) -> str | None:
        if self._clean(text):
            return None
        try:
            return self._finder.first(text)
        except TypeError:  # the Rust tokenizer takes valid Unicode only (no lone surrogates)
            where = ".".join(steps)
            raise InvalidRequest(
                f"{where} is not valid Unicode text (it holds a lone surrogate).", param=where
            ) from None


def _decoded(arguments: str, steps: list[str]) -> Any:
    """Tool-call arguments as the worker decodes them (`\\u003c` is `<` there)."""
    try:
        return decoded_arguments(arguments)
    except RecursionError:
        where = ".".join(steps)
        raise InvalidRequest(
            f"{where} is JSON nested more than {MAX_DEPTH} levels deep.", param=where
        ) from None


def _step(key: Any) -> str:
    """A key as one step of an error's `param` path (long keys clipped)."""
    text = str(key)
    return text if len(text) <= MAX_PATH_STEP else text[: MAX_PATH_STEP - 3] + "..."

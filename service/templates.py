"""Tokenizers and server-side chat templates.

The gateway renders each instruct model's own chat template (transformers' `render_jinja_template`,
the function behind `apply_chat_template`, which evaluates it in jinja2's immutable sandbox) and
tokenizes the result itself with the model's Rust `tokenizers` tokenizer, so the worker receives
token ids: BOS appears exactly once and clients never send special tokens.

A model folder with a `tokenizer.json` is read directly (the Rust tokenizer, the special tokens of
`tokenizer_config.json`, the chat template): transformers' `AutoTokenizer` would import its model stack
(torch included) into the gateway and take seconds per load (about 4 s for Gemma's 262k vocabulary).
Anything else (a hub id, a folder without `tokenizer.json`) goes through `AutoTokenizer`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Tokenizer, models

from service.errors import InvalidRequest
from service.settings import ModelKind, ModelSpec, Settings

# The named special tokens transformers hands to a chat template (its `special_tokens_map`).
SPECIAL_TOKEN_NAMES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
)  # fmt: skip

# Prompts shorter than this are tokenized on the event loop: a thread hop costs more than the work.
INLINE_TOKENIZE_CHARS = 2048


@dataclass(frozen=True)
class RenderedPrompt:
    """What the worker receives for a request: the prompt text and its token ids."""

    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class TokenizerFiles:
    """What the gateway needs of a model's tokenizer, however it was found."""

    tokenizer: Tokenizer
    special_tokens: dict[str, str]
    chat_template: str | None


class ControlTokenFinder:
    """Finds a tokenizer's control tokens written as plain text, e.g. `<|im_start|>` in a message.

    The tokenizer would turn such text into the real token (it matches added tokens even with
    `add_special_tokens=False`), letting a user forge turns. The matching is the tokenizers library's
    own (Aho-Corasick over the added tokens) on a tokenizer that has nothing else: a few
    microseconds for a short message, even for Gemma's 6,249 special tokens.
    """

    UNKNOWN = "\x00"

    def __init__(self, tokens: Sequence[str]) -> None:
        self._finder = Tokenizer(models.WordLevel({self.UNKNOWN: 0}, unk_token=self.UNKNOWN))
        self._finder.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in tokens])

    def first(self, text: str) -> str | None:
        """The first control token written in `text`, or None."""
        encoding = self._finder.encode(text, add_special_tokens=False)
        return next((token for token, id_ in zip(encoding.tokens, encoding.ids, strict=True) if id_), None)


def control_tokens(tokenizer: Tokenizer, named: dict[str, str]) -> list[str]:
    """The texts of a tokenizer's special (control) tokens: its special added tokens and the named
    ones (BOS, EOS, ...)."""
    special = {token.content for token in tokenizer.get_added_tokens_decoder().values() if token.special}
    return sorted(special | set(named.values()))


class ModelTokenizer:
    """One model's tokenizer, BOS policy, control tokens and (for instruct models) chat template."""

    def __init__(self, spec: ModelSpec, files: TokenizerFiles, chat_template: str | None) -> None:
        self.spec = spec
        self._tokenizer = files.tokenizer
        self._special_tokens: dict[str, Any] = dict(files.special_tokens)  # template variables too
        self._control = ControlTokenFinder(control_tokens(files.tokenizer, files.special_tokens))
        self.chat_template = chat_template
        # Imported here (tokenizers load in a thread once the workers are launching), not at the top:
        # importing transformers takes ~1.4 s and would hold back the workers' launch.
        from transformers.utils.chat_template_utils import render_jinja_template

        self._render = render_jinja_template
        self.bos_id = self._token_id("bos_token")
        self.eos_id = self._token_id("eos_token")
        # Whether the tokenizer itself puts BOS first (Gemma's prepared tokenizer does; GPT-2 style don't).
        probe = self._tokenizer.encode("a").ids
        self.adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id

    def _token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a raw completion prompt: BOS first exactly once when the model uses one."""
        return self._single_bos(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_many(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` for a batch, in one call into the Rust tokenizer (which may use several threads)."""
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        return [self._single_bos(encoding.ids) for encoding in encodings]

    def check_messages(self, messages: Sequence[dict[str, Any]]) -> None:
        """Refuse message text that holds a control token's text, unless the model allows it: user
        text never gets the power of control tokens (no forged turns)."""
        if self.spec.allow_control_tokens:
            return
        for index, message in enumerate(messages):
            for where, text in _texts(message):
                token = self._control.first(text)
                if token is not None:
                    raise InvalidRequest(
                        f"messages.{index}{where} contains {token!r}, a control token of model "
                        f"'{self.spec.name}'; control tokens cannot be sent as message text.",
                        param=f"messages.{index}{where}",
                        code="control_token_in_message",
                    )

    def render_chat(self, messages: Sequence[dict[str, Any]]) -> RenderedPrompt:
        """Render the chat template with a generation prompt, then tokenize without adding specials."""
        self.check_messages(messages)
        if self.chat_template is None:
            raise InvalidRequest(f"model '{self.spec.name}' has no chat template", param="model")
        try:
            # As `apply_chat_template` calls it: the special tokens are template variables. (Its
            # annotation says `str`; it returns the rendered conversations and generation indices.)
            rendered: Any = self._render(
                conversations=[list(messages)],
                chat_template=self.chat_template,
                add_generation_prompt=True,
                **self._special_tokens,
            )
            text: str = rendered[0][0]
        except jinja2.TemplateError as exc:
            # Templates reject conversations they can't render (e.g. roles that must alternate).
            raise InvalidRequest(
                f"The chat template rejected these messages: {exc}", param="messages"
            ) from exc
        # The template writes its own specials (BOS included when the model wants one).
        return RenderedPrompt(text=text, token_ids=self.encode(text, add_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids, special tokens kept (used to show exactly what the worker sees)."""
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def _single_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is None:
            return ids
        # A client prompt that itself starts with the BOS text must not produce BOS twice.
        start = 0
        while start < len(ids) and ids[start] == self.bos_id:
            start += 1
        if start == 0:
            return ids
        return ids[start - 1 :]


def load_tokenizer(spec: ModelSpec, settings: Settings) -> ModelTokenizer:
    """Load a model's tokenizer from its folder (or the hub, where reachable) and its chat template."""
    source = settings.resolve_source(spec.tokenizer_source)
    folder = Path(source)
    if not folder.is_dir() and source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"model {spec.name!r}: tokenizer folder {source} does not exist")
    if (folder / "tokenizer.json").is_file():
        files = read_tokenizer_folder(folder)
    else:
        files = load_with_transformers(source, local=folder.is_dir())
    template: str | None = None
    if spec.chat_template is not None:
        template = spec.chat_template.read_text()
    elif spec.kind is ModelKind.INSTRUCT:
        template = files.chat_template
    if spec.kind is ModelKind.INSTRUCT and not template:
        raise ValueError(
            f"model {spec.name!r} is `instruct` but its tokenizer has no chat template; "
            "set `chat_template` to a Jinja file"
        )
    return ModelTokenizer(spec, files, template)


def read_tokenizer_folder(folder: Path) -> TokenizerFiles:
    """The files `save_pretrained` writes, read as transformers reads them: `chat_template.jinja`
    before the config's `chat_template`, the config's special tokens over `special_tokens_map.json`."""
    config = _read_json(folder / "tokenizer_config.json")
    named = {**_read_json(folder / "special_tokens_map.json"), **config}
    special = {name: token for name in SPECIAL_TOKEN_NAMES if (token := _token_text(named.get(name)))}
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        template: str | None = template_file.read_text()
    else:
        template = _default_template(config.get("chat_template"))
    return TokenizerFiles(Tokenizer.from_file(str(folder / "tokenizer.json")), special, template)


def load_with_transformers(source: str, local: bool) -> TokenizerFiles:
    """A hub id or a folder without `tokenizer.json`: transformers finds (or converts) the tokenizer."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(source, local_files_only=local)
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{source}: transformers found no fast (Rust) tokenizer for it")
    special = {name: token for name, token in loaded.special_tokens_map.items() if isinstance(token, str)}
    return TokenizerFiles(backend, special, loaded.chat_template)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as configs write it: a string, or an AddedToken dict with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _default_template(value: Any) -> str | None:
    """A config's `chat_template`: one template, or named templates of which "default" is used."""
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def load_tokenizers(settings: Settings) -> dict[str, ModelTokenizer]:
    """Tokenizers of every configured model, by served name."""
    return {spec.name: load_tokenizer(spec, settings) for spec in settings.models}


def _texts(value: Any, where: str = "") -> list[tuple[str, str]]:
    """Every string inside a message (content, parts, names, tool calls), with where it is."""
    if isinstance(value, str):
        return [(where, value)]
    if isinstance(value, dict):
        return [
            found for key, item in value.items() if key != "role" for found in _texts(item, f"{where}.{key}")
        ]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in _texts(item, f"{where}.{index}")]
    return []


def messages_as_dicts(messages: Sequence[Any]) -> list[dict[str, str]]:
    """Validated chat messages as the plain dicts chat templates expect."""
    return [{"role": str(m.role), "content": m.text()} for m in messages]

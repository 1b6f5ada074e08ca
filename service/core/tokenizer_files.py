"""A model's tokenizer files, read as transformers reads them.

A model folder with a `tokenizer.json` is read directly (the Rust tokenizer, the special tokens of
`tokenizer_config.json`, the chat template): transformers' `AutoTokenizer` would import its model stack
(torch included) into the gateway and take seconds per load (about 4 s for Gemma's 262k vocabulary).
Anything else (a hub id, a folder without `tokenizer.json`) goes through `AutoTokenizer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from service.core.control_tokens import SPECIAL_TOKEN_NAMES


@dataclass(frozen=True)
class TokenizerFiles:
    """What the gateway needs of a model's tokenizer, however it was found."""

    tokenizer: Tokenizer
    special_tokens: dict[str, str]
    chat_template: str | None
    config: dict[str, Any]  # tokenizer_config.json (or transformers' init kwargs), as published


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
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return TokenizerFiles(tokenizer, special, template, public_config(named))


def load_with_transformers(source: str, local: bool) -> TokenizerFiles:
    """A hub id or a folder without `tokenizer.json`: transformers finds (or converts) the tokenizer."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(source, local_files_only=local)
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{source}: transformers found no fast (Rust) tokenizer for it")
    special = {name: token for name, token in loaded.special_tokens_map.items() if isinstance(token, str)}
    return TokenizerFiles(backend, special, loaded.chat_template, public_config(dict(loaded.init_kwargs)))


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer's configuration as vLLM's /tokenizer_info publishes it: JSON values only, special
    tokens as their text, no file paths, no chat template (given separately)."""
    hidden = {"vocab_file", "merges_file", "tokenizer_file", "name_or_path", "chat_template"}
    return {key: _json_value(value) for key, value in config.items() if key not in hidden}


def _json_value(value: Any) -> Any:
    if isinstance(value, dict):
        return value["content"] if isinstance(value.get("content"), str) else {
            key: _json_value(item) for key, item in value.items()
        }  # fmt: skip
    if isinstance(value, list | tuple):
        return [_json_value(item) for item in value]
    if getattr(value, "content", None) is not None:  # an AddedToken object
        return value.content
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


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

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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from tokenizers import AddedToken, Tokenizer, models

from service.errors import InvalidRequest
from service.ops.settings import ModelKind, ModelSpec, Settings

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
class ChatOptions:
    """What a chat request may change about rendering, as vLLM's chat endpoint takes it."""

    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False
    chat_template: str | None = None  # a request's own template (models that trust them)


DEFAULT_CHAT = ChatOptions()
# Names the renderer passes itself: a request's template kwargs cannot replace them.
RESERVED_TEMPLATE_VARS = frozenset(
    {"conversations", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
     "continue_final_message", "return_assistant_tokens_mask", "tokenize"}
)  # fmt: skip


@dataclass(frozen=True)
class TokenizerFiles:
    """What the gateway needs of a model's tokenizer, however it was found."""

    tokenizer: Tokenizer
    special_tokens: dict[str, str]
    chat_template: str | None
    config: dict[str, Any]  # tokenizer_config.json (or transformers' init kwargs), as published


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
        self.special_tokens = dict(files.special_tokens)
        self._special_tokens: dict[str, Any] = dict(files.special_tokens)  # template variables too
        self._control = ControlTokenFinder(control_tokens(files.tokenizer, files.special_tokens))
        self.config = files.config
        self.vocab_size = files.tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        # Imported here (tokenizers load in a thread once the workers are launching), not at the top:
        # importing transformers takes ~1.4 s and would hold back the workers' launch.
        from transformers.utils.chat_template_utils import render_jinja_template

        self._render = render_jinja_template
        self.bos_id = self._token_id("bos_token")
        self.bos_text = self._special_tokens.get("bos_token")
        self.eos_id = self._token_id("eos_token")
        # Whether the tokenizer itself puts BOS first (Gemma's prepared tokenizer does; GPT-2 style don't).
        probe = self._tokenizer.encode("a").ids
        self.adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id

    def _token_id(self, name: str) -> int | None:
        token = self._special_tokens.get(name)
        return None if token is None else self._tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a raw completion prompt: BOS first exactly once when the model uses one."""
        # The batch call, as fast for one text, lets go of the GIL (`encode` holds it throughout).
        encoding = self._tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]
        return self._single_bos(encoding.ids)

    def encode_for_worker(
        self, texts: Sequence[str], add_special_tokens: bool = True
    ) -> list[tuple[list[int], bool]]:
        """Token ids of raw prompts (one call into the Rust tokenizer, which may use several
        threads), each with whether they differ from the worker's own tokenizing of the same text
        (a prompt written with its own BOS: the gateway keeps one)."""
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
        found = []
        for encoding in encodings:
            ids = self._single_bos(encoding.ids)
            found.append((ids, len(ids) != len(encoding.ids)))
        return found

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """The tokens of `context` and of `continuation` after it, as evaluation harnesses split them
        (lm-evaluation-harness): trailing spaces of the context move to the continuation, the whole is
        tokenized once, and the continuation is what follows the context's own tokens."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        head = self.encode(context)
        return whole[: len(head)], whole[len(head) :]

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's token as the vocabulary spells it (vLLM's `token_strs`)."""
        return [self._tokenizer.id_to_token(token_id) or "" for token_id in token_ids]

    def check_messages(self, messages: Sequence[dict[str, Any]]) -> None:
        """Refuse message text that holds a control token's text (see `check_text`)."""
        self.check_text(messages, "messages")

    def check_text(self, value: Any, param: str) -> None:
        """Refuse user text (any string inside `value`) that holds a control token's text, unless the
        model allows it: user text never gets the power of control tokens (no forged turns)."""
        if self.spec.allow_control_tokens:
            return
        for where, text in _texts(value, param):
            token = self._control.first(text)
            if token is not None:
                raise InvalidRequest(
                    f"{where} contains {token!r}, a control token of model '{self.spec.name}'; control "
                    "tokens cannot be sent as message text.",
                    param=where,
                    code="control_token_in_message",
                )

    def render_chat(
        self, messages: Sequence[dict[str, Any]], options: ChatOptions = DEFAULT_CHAT
    ) -> RenderedPrompt:
        """Render the chat template as vLLM's chat endpoint does (same messages, tools, documents and
        template variables), then tokenize (the template writes its own special tokens)."""
        self.check_messages(messages)
        template = options.chat_template or self.chat_template
        if template is None:
            raise InvalidRequest(f"model '{self.spec.name}' has no chat template", param="model")
        variables = {**self._special_tokens, **(options.template_kwargs or {})}
        for name in RESERVED_TEMPLATE_VARS & variables.keys():
            del variables[name]
        try:
            # As `apply_chat_template` calls it: the special tokens are template variables. (Its
            # annotation says `str`; it returns the rendered conversations and generation indices.)
            rendered: Any = self._render(
                conversations=[conversation(messages, template)],
                tools=options.tools,  # type: ignore[arg-type]
                documents=options.documents,
                chat_template=template,
                add_generation_prompt=options.add_generation_prompt and not options.continue_final_message,
                continue_final_message=options.continue_final_message,
                **variables,
            )
            text: str = rendered[0][0]
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            # Templates reject conversations they can't render (e.g. roles that must alternate).
            raise InvalidRequest(
                f"The chat template rejected these messages: {exc}", param="messages"
            ) from exc
        ids = self.encode(text, add_special_tokens=options.add_special_tokens)
        return RenderedPrompt(text=text, token_ids=ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of token ids, special tokens kept (used to show exactly what the worker sees)."""
        # The batch call lets go of the GIL (`decode` holds it throughout).
        return self._tokenizer.decode_batch([list(token_ids)], skip_special_tokens=False)[0]

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


def messages_as_dicts(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Validated chat messages (pydantic models) as plain dicts, every field they carry kept."""
    return [m.model_dump(exclude_none=True) for m in messages]


def conversation(messages: Sequence[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """Messages as vLLM hands them to a chat template (its "string" content format): text parts
    joined by newlines, no content as "", assistant tool-call arguments parsed into objects, and
    `developer` messages turned into one leading system message when the template has no such
    role. Other parts (images) are the worker's business; the gateway counts the text."""
    result = [_template_message(message) for message in messages]
    if any(m["role"] == "developer" for m in result) and not re.search(r"""["']developer["']""", template):
        result = _developer_as_system(result)
    return result


TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "refusal"})


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, list):
        texts = [part.get("text") or "" for part in content
                 if isinstance(part, dict) and part.get("type", "text") in TEXT_PART_TYPES]  # fmt: skip
        content = "\n".join(texts)
    result: dict[str, Any] = {"role": message["role"], "content": content or ""}
    for key in ("name", "tool_call_id"):
        if isinstance(message.get(key), str):
            result[key] = message[key]
    if message["role"] == "assistant":
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            result["tool_calls"] = [_with_parsed_arguments(call) for call in calls]
        if message.get("reasoning") is not None:
            result["reasoning"] = result["reasoning_content"] = message["reasoning"]
    return result


def _with_parsed_arguments(call: Any) -> Any:
    """Templates expect tool-call arguments as an object; OpenAI clients send a JSON string."""
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments else {}
        except ValueError:
            parsed = {}
        arguments = parsed if isinstance(parsed, dict) else {}
    return {**call, "function": {**call["function"], "arguments": arguments or {}}}


def _developer_as_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`developer` as `system`, and every system message merged into one at the start."""
    converted = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
    systems = [i for i, m in enumerate(converted) if m["role"] == "system"]
    if systems in ([], [0]):
        return converted
    merged = "\n\n".join(m["content"] for m in converted if m["role"] == "system" and m["content"])
    return [{"role": "system", "content": merged}, *(m for m in converted if m["role"] != "system")]

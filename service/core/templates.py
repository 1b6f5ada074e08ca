"""Tokenizers and server-side chat templates.

The gateway renders each instruct model's own chat template (transformers' `render_jinja_template`,
the function behind `apply_chat_template`, which evaluates it in jinja2's immutable sandbox) and
tokenizes the result itself with the model's Rust `tokenizers` tokenizer, so the worker receives
token ids: BOS appears exactly once and user text never acts as a control token
(`service.core.chat_render`). Tokenizer files are read by `service.core.tokenizer_files`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.core.chat_render import DEFAULT_CHAT as DEFAULT_CHAT  # the names callers import from here
from service.core.chat_render import ChatOptions as ChatOptions
from service.core.chat_render import ChatRenderer
from service.core.chat_render import RenderedPrompt as RenderedPrompt
from service.core.client_templates import ClientTemplates
from service.core.control_tokens import ControlTokenRule, control_tokens
from service.core.tokenizer_files import TokenizerFiles, load_with_transformers, read_tokenizer_folder
from service.errors import GatewayError
from service.ops.settings import ModelKind, ModelSpec, Settings

# Prompts shorter than this are tokenized on the event loop: a thread hop costs more than the work.
INLINE_TOKENIZE_CHARS = 2048
END_OF_TURN_PROBE = "gateway end-of-turn probe"


class ModelTokenizer:
    """One model's tokenizer, BOS policy, control tokens and (for instruct models) chat template."""

    def __init__(
        self,
        spec: ModelSpec,
        files: TokenizerFiles,
        chat_template: str | None,
        client_templates: ClientTemplates | None = None,
        adapter_templates: ClientTemplates | None = None,
        name: str | None = None,
        budgeted: bool = False,
    ) -> None:
        self.spec = spec
        shown = name or spec.name  # the served name its refusals name
        self._files = files
        self._adapter_templates = adapter_templates  # where adapters' own templates render
        self._empty_chat: int | None = None
        self._client_templates = client_templates
        self._tokenizer = files.tokenizer
        self.special_tokens = dict(files.special_tokens)
        tokens = control_tokens(files.tokenizer, files.special_tokens)
        ids = [i for i in map(files.tokenizer.token_to_id, tokens) if i is not None]
        self._control_ids = frozenset(ids)
        self._rule = ControlTokenRule(shown, tokens, ids, enforced=not spec.allow_control_tokens)
        self.config = files.config
        self.vocab_size = files.tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.bos_id = self._token_id("bos_token")
        self.bos_text = self.special_tokens.get("bos_token")
        self.eos_id = self._token_id("eos_token")
        # Whether the tokenizer itself puts BOS first (Gemma's prepared tokenizer does; GPT-2 style don't).
        probe = self._tokenizer.encode("a").ids
        self.adds_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
        trusted = client_templates if spec.trust_request_chat_template else None
        self._chat = ChatRenderer(
            shown, chat_template, self.special_tokens, self._rule, self.encode,
            self._tokenizer.id_to_token, trusted, adapter_templates if budgeted else None,
        )  # fmt: skip

    def with_chat_template(self, template: str, name: str) -> ModelTokenizer:
        """The same tokenizer rendering chats with another template (an instruct adapter's own): the
        control-token rule's check on the result then compares with what that template writes. Not the
        model's own, it renders like one sent in a request: in the sandbox, under a time budget. `name`:
        the served name its refusals name (the adapter's)."""
        shared = self._adapter_templates or self._client_templates
        runner = shared.sibling() if shared is not None else None
        return ModelTokenizer(self.spec, self._files, template, self._client_templates, runner, name, True)

    def end_of_turn_id(self) -> int | None:
        """The control token its chat template writes right after an assistant's turn (`<|im_end|>`,
        `<end_of_turn>`), where a model trained on the template stops; None if it writes none."""
        turns = [{"role": "user", "content": "u"}, {"role": "assistant", "content": END_OF_TURN_PROBE}]
        try:
            text = self.render_chat(turns, ChatOptions(add_generation_prompt=False)).text
        except GatewayError:  # a template that cannot end on an assistant's turn
            return None
        at = text.find(END_OF_TURN_PROBE)
        after = self.encode(text[at + len(END_OF_TURN_PROBE) :], False) if at >= 0 else []
        return after[0] if after and after[0] in self._control_ids else None

    @property
    def client_templates(self) -> ClientTemplates | None:
        """Where templates sent in requests run; None when this model refuses them."""
        return self._chat.client

    @property
    def budgeted(self) -> bool:
        """Whether its template is not the model's trusted own (an adapter's): rendered under a budget."""
        return self._chat.own_budget is not None

    def empty_chat_tokens(self) -> int:
        """The tokens its trusted template writes for no message at all (its BOS and generation prompt), 0
        if it renders none; rendered once. A budgeted template renders it per request (`Gateway`)."""
        assert not self.budgeted, "an adapter's template renders in its executor, per request"
        if self._empty_chat is None:
            try:
                self._empty_chat = len(self.render_chat([]).token_ids)
            except GatewayError:
                self._empty_chat = 0
        return self._empty_chat

    def budgeted_runner(self, options: ChatOptions) -> ClientTemplates | None:
        """The executor a render with `options` runs in, apart from the shared pool, when its template is
        not the model's trusted own (sent in the request, or an adapter's); None: the shared pool."""
        return self._chat.client if options.chat_template is not None else self._chat.own_budget

    def _token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
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
        """Refuse messages that hold a control token's text (see `check_text`)."""
        self.check_text(messages, "messages")

    def check_text(self, value: Any, param: str) -> None:
        """Refuse user text (any key or string inside `value`) that holds a control token's text,
        unless the model allows it: user text never gets the power of control tokens."""
        self._rule.check(value, param)

    def check_template_kwargs(self, kwargs: dict[str, Any] | None) -> None:
        """Refuse template variables naming special tokens or the renderer's own, or holding a
        control token's text."""
        self._rule.check_template_kwargs(kwargs)

    def render_chat(
        self, messages: Sequence[dict[str, Any]], options: ChatOptions = DEFAULT_CHAT
    ) -> RenderedPrompt:
        """Render the chat template as vLLM's chat endpoint does (same messages, tools, documents and
        template variables), then tokenize (the template writes its own special tokens); refused
        when user text would act as a control token."""
        return self._chat.render(messages, options)

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


def client_templates(settings: Settings) -> ClientTemplates:
    """The executor and budget of chat templates sent in requests (shared by every model)."""
    return ClientTemplates(
        settings.client_template_timeout, settings.client_template_threads, settings.max_prompt_chars
    )


def adapter_templates(settings: Settings) -> ClientTemplates:
    """The executor and budget of adapters' own chat templates, apart from the shared pool and from
    templates sent in requests (each adapter gets a `sibling` of its own): no cap on renders waiting, as
    for a model's own."""
    return ClientTemplates(
        settings.client_template_timeout, settings.client_template_threads, settings.max_prompt_chars,
        waiting_per_thread=None, name="adapter-template",
    )  # fmt: skip


def load_tokenizer(
    spec: ModelSpec, settings: Settings, shared: ClientTemplates | None = None,
    adapters: ClientTemplates | None = None,
) -> ModelTokenizer:  # fmt: skip
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
    return ModelTokenizer(
        spec, files, template, shared or client_templates(settings), adapters or adapter_templates(settings)
    )


def load_tokenizers(settings: Settings) -> dict[str, ModelTokenizer]:
    """Tokenizers of every configured model, by served name."""
    shared, adapters = client_templates(settings), adapter_templates(settings)
    return {spec.name: load_tokenizer(spec, settings, shared, adapters) for spec in settings.models}

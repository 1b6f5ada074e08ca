"""Rendering a conversation as vLLM's chat endpoint does, with the control-token rule enforced on
what the worker will see.

Before rendering, everything handed to the template is scanned (`ControlTokenRule`); after
rendering and tokenizing, the prompt's control tokens must be exactly those the template writes for
the same structure with placeholder text (`service.core.skeleton`), cached by the skeleton's
fingerprint. The model's own template renders with transformers' `render_jinja_template` (what
vLLM uses, so the gateway renders what the worker renders); a template sent in a request renders in
`ClientTemplates`' sandbox under its time budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2

from service.core.client_templates import ClientTemplates, Deadline
from service.core.control_tokens import ControlTokenRule
from service.core.conversation import conversation
from service.core.skeleton import ControlSequences, fingerprint, skeleton
from service.core.template_sandbox import TemplateBudgetExceeded
from service.errors import InvalidRequest

if TYPE_CHECKING:
    from service.core.protocol import ChatOptionsFields

# (conversation, tools, documents, template variables) -> the rendered text
Render = Callable[[list[dict[str, Any]], Any, Any, dict[str, Any]], str]


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
    param: str = "messages"  # where the messages are in the request, for errors
    # What vLLM hands the template from the request's own fields (reasoning_effort, enable_thinking),
    # so that any branch the worker's render would take runs here first, under the same bounds.
    variables: dict[str, Any] | None = None
    # The caller's cache group: the check's cache never tells one group what another rendered.
    cache_group: str | None = None

    @classmethod
    def of(cls, request: ChatOptionsFields, param: str = "messages") -> ChatOptions:
        """The options a chat request's fields ask for: every route that renders one (chat, its
        batch route, /tokenize) takes them from here, so each renders what the worker would."""
        return cls(
            tools=request.tools,
            documents=request.documents,
            add_generation_prompt=request.add_generation_prompt is not False,
            continue_final_message=bool(request.continue_final_message),
            template_kwargs=request.chat_template_kwargs,
            add_special_tokens=bool(request.add_special_tokens),
            chat_template=request.chat_template,
            param=param,
            variables=request_variables(request.model_extra or {}, request.chat_template_kwargs or {}),
        )

    @property
    def template_variables(self) -> dict[str, Any]:
        """The template's variables besides the special tokens: vLLM's merge (request fields win)."""
        return {**(self.template_kwargs or {}), **(self.variables or {})}


def request_variables(fields: dict[str, Any], template_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The variables vLLM's chat endpoint adds from a request's fields (`build_chat_params`): its
    `reasoning_effort`, and `enable_thinking` derived from it unless the request's kwargs set it."""
    effort = fields.get("reasoning_effort")
    if effort is None or effort == "auto":  # vLLM's merge drops these values
        return {}
    variables = {"reasoning_effort": effort}
    if "enable_thinking" not in template_kwargs:
        variables["enable_thinking"] = effort != "none"
    return variables


DEFAULT_CHAT = ChatOptions()


class ChatRenderer:
    """One instruct model's chat rendering, checked before and after."""

    def __init__(
        self,
        model: str,
        template: str | None,
        special_tokens: dict[str, str],
        rule: ControlTokenRule,
        encode: Callable[[str, bool], list[int]],
        token_text: Callable[[int], str | None],
        client: ClientTemplates | None,
        own_budget: ClientTemplates | None = None,
    ) -> None:
        self.model = model
        self.template = template
        # Set: its own template is not the model's trusted one (an adapter's, from its folder) and renders
        # like a sent one, in the sandbox and under a time budget.
        self.own_budget = own_budget
        self._special_tokens: dict[str, Any] = dict(special_tokens)
        self._rule = rule
        self._encode = encode
        self._token_text = token_text
        self.client = client  # None: templates in requests are refused
        self._sequences = ControlSequences()
        # Imported here (tokenizers load in a thread once the workers are launching), not at the top:
        # importing transformers takes ~1.4 s and would hold back the workers' launch.
        from transformers.utils.chat_template_utils import render_jinja_template

        self._transformers_render = render_jinja_template

    def render(self, messages: Sequence[dict[str, Any]], options: ChatOptions) -> RenderedPrompt:
        """The prompt of a conversation: checked, rendered, tokenized, checked again."""
        if options.chat_template is None:
            if self.template is None:
                raise InvalidRequest(f"model '{self.model}' has no chat template", param="model")
            if self.own_budget is not None:
                return self._budgeted(messages, options)
            return self._checked(messages, options, self.template, self._own(options))
        if self.client is None:
            raise InvalidRequest(
                f"Model '{self.model}' does not accept a chat template in requests; its own is used.",
                param="chat_template",
            )
        deadline = self.client.deadline()
        try:
            return self._checked(messages, options, options.chat_template, self._sent(options, deadline))
        except TemplateBudgetExceeded as exc:
            raise InvalidRequest(
                f"The request's chat template {exc.message}, so it was stopped.",
                param="chat_template",
                code="chat_template_budget_exceeded",
            ) from None

    def _budgeted(self, messages: Sequence[dict[str, Any]], options: ChatOptions) -> RenderedPrompt:
        """Its own template in the sandbox, under a time budget (an adapter's: not the model's own)."""
        assert self.own_budget is not None and self.template is not None
        deadline = self.own_budget.deadline()
        whose = f"The chat template of model '{self.model}'"
        render = self._sandboxed(self.own_budget, self.template, options, deadline, whose, options.param)
        try:
            return self._checked(messages, options, self.template, render)
        except TemplateBudgetExceeded as exc:
            raise InvalidRequest(
                f"The chat template of model '{self.model}' {exc.message} on these messages, so it was "
                "stopped.",
                param=options.param,
                code="chat_template_budget_exceeded",
            ) from None

    def _checked(
        self, messages: Sequence[dict[str, Any]], options: ChatOptions, template: str, render: Render
    ) -> RenderedPrompt:
        rule = self._rule
        rule.check(messages, options.param)
        rule.check(options.tools, "tools")
        rule.check(options.documents, "documents")
        rule.check_template_kwargs(options.template_kwargs)
        for name, value in (options.variables or {}).items():
            rule.check(value, name)
        converted = conversation(messages, template, options.param)
        variables = {**self._special_tokens, **options.template_variables}
        text = render(converted, options.tools, options.documents, variables)
        ids = self._encode(text, options.add_special_tokens)
        if rule.enforced:
            self._check_result(ids, converted, options, render)
        return RenderedPrompt(text=text, token_ids=ids)

    def _check_result(
        self, ids: list[int], converted: list[dict[str, Any]], options: ChatOptions, render: Render
    ) -> None:
        """The prompt's control tokens are the ones its template writes for the same structure."""
        parts = (
            skeleton(converted), skeleton(options.tools), skeleton(options.documents),
            skeleton(options.template_variables, names=True),
        )  # fmt: skip
        flags = (options.add_generation_prompt, options.continue_final_message, options.add_special_tokens)
        key = fingerprint(options.cache_group, options.chat_template or "", flags, *parts)
        expected = self._sequences.get(key)
        if expected is None:
            expected = self._skeleton_sequence(parts, options, render)
            self._sequences.put(key, expected)
        found = self._rule.sequence(ids)
        if found != expected:
            raise InvalidRequest(
                f"User text in this request would act as {self._difference(found, expected)} of model "
                f"'{self.model}' once rendered: the prompt would hold control tokens its chat template does "
                "not write for this conversation. Control tokens cannot come from user text.",
                param=options.param,
                code="control_token_in_message",
            )

    def _skeleton_sequence(
        self, parts: tuple[Any, ...], options: ChatOptions, render: Render
    ) -> tuple[int, ...]:
        conversation_, tools, documents, kwargs = parts
        try:
            text = render(conversation_, tools, documents, {**self._special_tokens, **kwargs})
        except InvalidRequest as exc:
            raise InvalidRequest(
                "The control-token check renders this conversation's structure with placeholder text, and "
                f"the chat template rejected that ({exc.message}).",
                param=options.param,
            ) from None
        return self._rule.sequence(self._encode(text, options.add_special_tokens))

    def _difference(self, found: tuple[int, ...], expected: tuple[int, ...]) -> str:
        """The first control token that differs, as text."""
        at = next((i for i, (a, b) in enumerate(zip(found, expected, strict=False)) if a != b), None)
        at = min(len(found), len(expected)) if at is None else at
        token_id = found[at] if at < len(found) else None
        if token_id is None:
            return "a control token"
        return f"the control token {self._token_text(token_id) or token_id!r}"

    def _own(self, options: ChatOptions) -> Render:
        """The model's own template, rendered by transformers as vLLM renders it."""
        assert self.template is not None
        template = self.template
        flags = _flags(options)

        def own(chat: list[dict[str, Any]], tools: Any, documents: Any, variables: dict[str, Any]) -> str:
            try:
                # As `apply_chat_template` calls it: the special tokens are template variables. (Its
                # annotation says `str`; it returns the rendered conversations and generation indices.)
                rendered: Any = self._transformers_render(
                    conversations=[chat], tools=tools, documents=documents, chat_template=template,
                    **flags, **variables,
                )  # fmt: skip
                return str(rendered[0][0])
            except (jinja2.TemplateError, ValueError, TypeError, RecursionError) as exc:
                # Templates reject conversations they can't render (e.g. roles that must alternate).
                raise InvalidRequest(
                    f"The chat template rejected these messages: {exc}", param=options.param
                ) from exc

        return own

    def _sent(self, options: ChatOptions, deadline: Deadline) -> Render:
        """A template sent in the request: the sandbox, under the request's deadline."""
        assert self.client is not None and options.chat_template is not None
        return self._sandboxed(
            self.client,
            options.chat_template,
            options,
            deadline,
            "The request's chat template",
            "chat_template",
        )

    @staticmethod
    def _sandboxed(
        runner: ClientTemplates,
        template: str,
        options: ChatOptions,
        deadline: Deadline,
        whose: str,
        param: str,
    ) -> Render:
        """`template` rendered in the sandbox under `deadline`; what it raises is a 400 about `whose`."""
        flags = _flags(options)

        def sandboxed(
            chat: list[dict[str, Any]], tools: Any, documents: Any, variables: dict[str, Any]
        ) -> str:
            try:
                rendered = deadline.run(
                    lambda: runner.render([chat], tools, documents, template, **flags, **variables)
                )
                return rendered[0][0]
            except Exception as exc:  # anything such a template raises is for its author to fix
                raise InvalidRequest(f"{whose} failed on these messages: {exc}", param=param) from None

        return sandboxed


def _flags(options: ChatOptions) -> dict[str, bool]:
    return {
        "add_generation_prompt": options.add_generation_prompt and not options.continue_final_message,
        "continue_final_message": options.continue_final_message,
    }

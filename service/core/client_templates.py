"""Chat templates sent in requests (models with `trust_request_chat_template`), run under a budget.

A client's Jinja can loop (`range` caps one loop at 100,000 steps, not their nesting) or recurse
(macros) for as long as it likes, and threads cannot be killed. So such a template renders:
- in a small executor of its own, never in the pool that renders and tokenizes for everyone, with
  a bounded queue (past it: 503, retry later);
- under a deadline enforced inside the render: a trace function on that thread raises once the
  request's budget is spent (checked at every Python line and call of the render, the compiled
  template's included);
- in `BoundedSandbox`, which caps every value it builds and its output.
The model's own template keeps transformers' renderer (what vLLM uses): it is trusted and fast.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from copy import deepcopy
from types import FrameType
from typing import Any, TypeVar

import jinja2

from service.core.template_sandbox import BoundedSandbox, TemplateBudgetExceeded
from service.errors import Overloaded

T = TypeVar("T")
FINAL_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
WAITING_PER_THREAD = 16  # client renders waiting per executor thread before new ones are refused


class Deadline:
    """A time budget for one request's client-template renders (they share it)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def run(self, render: Callable[[], T]) -> T:
        """`render()` on this thread with a trace function that stops it past the deadline."""
        end, seconds = self._end, self.seconds

        def trace(frame: FrameType, event: str, arg: Any) -> Any:
            if time.monotonic() > end:
                raise TemplateBudgetExceeded(
                    f"ran longer than its budget of {seconds:g} s (GATEWAY_CLIENT_TEMPLATE_TIMEOUT)"
                )
            return trace

        previous = sys.gettrace()
        sys.settrace(trace)
        try:
            return render()
        finally:
            sys.settrace(previous)


class ClientTemplates:
    """Where and how templates sent in requests run: the executor, the time budget, the cap on what
    they build (characters), compiled templates cached by their text."""

    def __init__(
        self, seconds: float, threads: int, max_chars: int,
        waiting_per_thread: int | None = WAITING_PER_THREAD, name: str = "client-template",
    ) -> None:  # fmt: skip
        self.seconds = seconds
        self.threads = threads
        self.waiting_cap = None if waiting_per_thread is None else threads * waiting_per_thread
        self.name = name
        self.max_chars = max_chars
        self._sandbox = BoundedSandbox(max_chars)
        self._compiled = functools.lru_cache(maxsize=16)(self._sandbox.from_string)
        self._executor: ThreadPoolExecutor | None = None
        self._waiting = 0
        self._lock = threading.Lock()

    def sibling(self) -> ClientTemplates:
        """An executor like this one, of its own (each adapter's template renders in one: a slow one slows
        only its own adapter's chats)."""
        per_thread = None if self.waiting_cap is None else self.waiting_cap // self.threads
        return ClientTemplates(self.seconds, self.threads, self.max_chars, per_thread, self.name)

    def deadline(self) -> Deadline:
        """A fresh budget for one request."""
        return Deadline(self.seconds)

    async def run(self, model: str, render: Callable[[], T]) -> T:
        """`render()` in the client-template executor (a 503 when its queue is full)."""
        with self._lock:
            if self.waiting_cap is not None and self._waiting >= self.waiting_cap:
                raise Overloaded(model, "too many chat templates sent in requests are waiting to render")
            self._waiting += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix=self.name)
            executor = self._executor
        try:
            context = contextvars.copy_context()
            return await asyncio.get_running_loop().run_in_executor(executor, context.run, render)
        finally:
            with self._lock:
                self._waiting -= 1

    def render(
        self,
        conversations: Sequence[list[dict[str, Any]]],
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        chat_template: str = "",
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        **variables: Any,
    ) -> tuple[list[str], list[Any]]:
        """transformers' `render_jinja_template` (its signature and result), in the sandbox and with
        the output capped; run it under a `Deadline`."""
        template = self._compiled(chat_template)
        rendered = []
        for chat in conversations:
            final = None
            if continue_final_message:
                chat, final = _tag_final_message(chat, chat_template)
            text = self._generate(
                template, messages=chat, tools=tools, documents=documents,
                add_generation_prompt=add_generation_prompt, **variables,
            )  # fmt: skip
            rendered.append(text if final is None else _cut_after(text, final))
        return rendered, []

    def _generate(self, template: jinja2.Template, **context: Any) -> str:
        pieces, size = [], 0
        for piece in template.generate(**context):
            size += len(piece)
            if size > self.max_chars:
                raise TemplateBudgetExceeded(
                    f"wrote more than {self.max_chars:,} characters (GATEWAY_MAX_PROMPT_CHARS)"
                )
            pieces.append(piece)
        return "".join(pieces)


def _tag_final_message(chat: list[dict[str, Any]], template: str) -> tuple[list[dict[str, Any]], str]:
    """As transformers continues a final message: its content marked, to cut the render after it."""
    if not chat or chat[-1].get("content") is None:
        raise ValueError('continue_final_message is set but the final message has no "content" to continue')
    if "content" not in template:
        raise ValueError('continue_final_message is set but the chat template has no "content" field')
    chat = deepcopy(chat)
    final = str(chat[-1]["content"])
    chat[-1]["content"] = final + FINAL_TAG
    return chat, final


def _cut_after(rendered: str, final: str) -> str:
    if final.strip() not in rendered or FINAL_TAG.strip() not in rendered:
        raise ValueError("continue_final_message is set but the template dropped the final message")
    at = rendered.rindex(FINAL_TAG.strip())
    if rendered[at : at + len(FINAL_TAG)] == FINAL_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()

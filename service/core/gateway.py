"""The gateway's shared state and the steps every generation request goes through:
resolve the model, tokenize, fit the context, send to a worker, shape the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi.responses import Response
from pydantic import BaseModel

from service.core.adapter_send import LOAD_SPAN, AdapterOnWorker
from service.core.caps import prompt_logprobs_source, sequences_per_prompt
from service.core.context import RequestContext
from service.core.key_limits import Charge
from service.core.relay import OPENAI_STREAM, Relay, RelayResponse, StreamFormat
from service.core.served import ServedModel, ServedModels, models_of
from service.core.templates import (
    DEFAULT_CHAT,
    INLINE_TOKENIZE_CHARS,
    ChatOptions,
    ModelTokenizer,
    RenderedPrompt,
)
from service.core.tenancy import OPEN, Caller
from service.core.tenants import Tenants
from service.core.translate import StreamTranslator
from service.errors import (
    ContextLengthExceeded,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    shown,
)
from service.ops.metrics import Metrics
from service.ops.record import RequestRecord
from service.ops.settings import ModelKind, RoutingPolicy, Settings
from service.ops.tracing import Tracing
from service.workers.answer import Answer
from service.workers.lora import AdapterLoads
from service.workers.pool import Lease, ModelPool, Worker
from service.workers.routing import NO_HINT, RouteHint
from service.workers.transport import Body, Transport, WatchedStream, no_token_in_time

# How each field that asks for prompt logprobs is named in a refusal.
SCORING_CAUSES = {
    "prompt_logprobs": "Prompt logprobs",
    "echo": "With `echo` the worker computes prompt logprobs (as vLLM derives them), which",
    "continuation": "Scoring a continuation takes prompt logprobs, which",
}
COMPLETIONS_PATH = "/v1/completions"
CHAT_PATH = "/v1/chat/completions"
T = TypeVar("T")
# A call to a worker: (worker, trace headers or None) -> what it returned.
Send = Callable[[Worker, dict[str, str] | None], Awaitable[T]]
NO_SPAN: AbstractContextManager[None] = nullcontext()

log = logging.getLogger(__name__)


def check_fits(
    prompt_tokens: int, requested: int | None, context: int, param: str = "prompt", asked: str = "max_tokens"
) -> None:
    """Refuse (400, with the numbers) a prompt that leaves no room in the context, or a prompt
    plus the tokens asked for that is over it. `param`: where the prompt came from (`messages` for a
    rendered conversation); `asked`: the field that asked for the tokens."""
    if prompt_tokens >= context:
        raise ContextLengthExceeded(
            f"The prompt is {prompt_tokens} tokens but this model's context is {context} tokens; "
            "shorten the prompt.",
            param=param,
        )
    if requested is not None and prompt_tokens + requested > context:
        raise ContextLengthExceeded(
            f"The prompt ({prompt_tokens} tokens) plus {asked} ({shown(requested)}) is "
            f"{shown(prompt_tokens + requested)} tokens, over this model's context of {context} tokens; "
            f"ask for at most {context - prompt_tokens} tokens.",
            param=asked,
        )


def fit_max_tokens(
    prompt_tokens: int, requested: int | None, context: int, cap: int, param: str = "prompt"
) -> int:
    """Tokens to generate: the request's own if it fits, else the rest of the context up to `cap`
    (the native endpoints' default; /v1 leaves an omitted max_tokens to the worker, as vLLM does).
    `param`: the field the prompt came from (a chat's is its messages)."""
    check_fits(prompt_tokens, requested, context, param)
    return requested if requested is not None else min(context - prompt_tokens, cap)


@dataclass
class Gateway:
    """What the routes share: settings, the served models and their pools, and the upstream client."""

    settings: Settings
    pools: dict[str, ModelPool]  # the replicas of each configured model
    tokenizers: dict[str, ModelTokenizer]  # each configured model's
    transport: Transport
    metrics: Metrics
    streams: set[WatchedStream]  # open worker streams (a drain ends the ones still open)
    tracing: Tracing | None = None  # None: tracing off
    tenants: Tenants | None = None  # keys managed at runtime: their limits and usage
    models: ServedModels = field(init=False)  # every name a request may send as `model`
    loads: AdapterLoads = field(init=False)  # adapters onto workers (see workers/lora.py)
    registry: Any = None  # the adapters' registry (core/adapters.py), once the app has started it

    def __post_init__(self) -> None:
        self.models = models_of(self.pools, self.tokenizers)
        self.loads = AdapterLoads(self.transport, self.metrics)

    def resolve(
        self, name: str | None, default_kind: ModelKind, caller: Caller = OPEN, any_kind: bool = False
    ) -> ServedModel:
        """The named model, or the first one of `default_kind` (a 404 listing the served names); for a
        key with a policy, the first of that kind it may use (`any_kind`: an endpoint any model serves,
        else the first it may use at all), and a 403 naming the rule for one it may not."""
        policy = caller.policy
        if policy is None:
            return self.models.resolve(name, default_kind)
        if name is None or name not in self.models:
            allowed = [model for model in self.models.values() if policy.allows(model)]
            if name is not None:
                raise ModelNotFound(name, [model.name for model in allowed])
            fitting = [model for model in allowed if model.kind is default_kind]
            fitting = fitting or (allowed if any_kind else [])
            name = fitting[0].name if fitting else None  # none: the gateway's default, refused by the rule
        model = self.models.resolve(name, default_kind)
        refusal = policy.refusal(model)
        if refusal is not None:
            if self.tenants is not None and caller.key_id is not None:
                self.tenants.refused(caller.key_id, refusal)
            raise refusal
        return model

    def charge(
        self,
        caller: Caller,
        model: ServedModel,
        prompts: Sequence[int] | None,
        max_tokens: int | None,
        n: int = 1,
    ) -> Charge | None:
        """What a request may cost its key's token budget (`prompts`: each prompt's token count, None
        when not counted; `max_tokens` as sent, None: vLLM's default); None without a key."""
        if self.tenants is None:
            return None
        return self.tenants.charge(caller, model.name, prompts, max_tokens, n, self.context_of(model))

    def holds_plenty(self, charge: Charge | None) -> bool:
        """Whether this process holds plenty of the key's budget for `charge` (no budget: True)."""
        return charge is None or self.tenants is None or self.tenants.limits.holds_plenty(charge)

    async def encode(
        self,
        model: ServedModel,
        text: str,
        add_special_tokens: bool = True,
        record: RequestRecord | None = None,
    ) -> list[int]:
        """Token ids of a raw prompt; long prompts are tokenized off the event loop (by a tokenizer
        call that lets go of the GIL, so the loop runs meanwhile)."""
        tokenizer = model.tokenizer
        with self.span(record, "gateway.tokenize"):
            if len(text) < INLINE_TOKENIZE_CHARS:
                return tokenizer.encode(text, add_special_tokens)
            return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)

    async def encode_for_worker(
        self,
        model: ServedModel,
        texts: list[str],
        add_special_tokens: bool = True,
        record: RequestRecord | None = None,
    ) -> list[tuple[list[int], bool]]:
        """Token ids of raw prompts (see `ModelTokenizer.encode_for_worker`); a batch or a long
        prompt is tokenized in one call off the event loop."""
        tokenizer = model.tokenizer
        with self.span(record, "gateway.tokenize"):
            if len(texts) == 1 and len(texts[0]) < INLINE_TOKENIZE_CHARS:
                return tokenizer.encode_for_worker(texts, add_special_tokens)
            return await asyncio.to_thread(tokenizer.encode_for_worker, texts, add_special_tokens)

    async def encode_pair(
        self, model: ServedModel, context: str, continuation: str, record: RequestRecord | None = None
    ) -> tuple[list[int], list[int]]:
        """The tokens of a scored context and continuation (see `ModelTokenizer.encode_pair`); long
        texts are tokenized off the event loop."""
        tokenizer = model.tokenizer
        with self.span(record, "gateway.tokenize"):
            if len(context) + len(continuation) < INLINE_TOKENIZE_CHARS:
                return tokenizer.encode_pair(context, continuation)
            return await asyncio.to_thread(tokenizer.encode_pair, context, continuation)

    def span(self, record: RequestRecord | None, name: str) -> AbstractContextManager[Any]:
        """A child span of the request's for a block of gateway work; nothing with tracing off."""
        if record is None or record.span is None or self.tracing is None:
            return NO_SPAN
        return self.tracing.child(record.span, name)

    async def render(
        self,
        model: ServedModel,
        messages: Sequence[dict[str, Any]],
        options: ChatOptions = DEFAULT_CHAT,
        record: RequestRecord | None = None,
        cache_group: str | None = None,
    ) -> RenderedPrompt:
        """Chat template rendering and tokenizing, off the event loop (what it caches, kept apart
        per cache group)."""
        started = time.perf_counter()
        if cache_group is not None:
            options = dataclasses.replace(options, cache_group=cache_group)
        with self.span(record, "gateway.render") as span:
            tokenizer = model.tokenizer
            job = functools.partial(tokenizer.render_chat, messages, options)
            # A template sent in the request, or an adapter's, renders in its own executor, never in the
            # shared pool.
            client = tokenizer.budgeted_runner(options)
            rendered = await (client.run(model.name, job) if client is not None else asyncio.to_thread(job))
            if span is not None:
                span.set_attribute("gen_ai.usage.input_tokens", len(rendered.token_ids))
        self.metrics.child(self.metrics.render, model.name).observe(time.perf_counter() - started)
        return rendered

    async def empty_chat_tokens(self, model: ServedModel, options: ChatOptions = DEFAULT_CHAT) -> int:
        """The tokens `model`'s template writes for an empty conversation (what a key pays for one; 0 if it
        renders none). A budgeted template (an adapter's) renders it per request in its executor, and one
        over its budget is refused: the worker, which renders it with no budget, must not get it."""
        if not model.tokenizer.budgeted:
            return model.tokenizer.empty_chat_tokens()
        try:
            return len((await self.render(model, [], options)).token_ids)
        except InvalidRequest as exc:
            if exc.code == "chat_template_budget_exceeded":
                raise
            return 0
        except GatewayError:
            return 0

    def check_context(
        self,
        model: ServedModel,
        prompt_tokens: int,
        requested: int | None,
        param: str = "prompt",
        asked: str = "max_tokens",
    ) -> None:
        """The request's prompt and the tokens it asks for fit in the model's context (see `check_fits`
        for `param` and `asked`)."""
        check_fits(prompt_tokens, requested, self.context_of(model), param, asked)

    def check_scoring(self, model: ServedModel, request: BaseModel, prompt_tokens: int) -> None:
        """Prompt logprobs make the worker hold prompt_tokens x vocabulary floats at once: refuse
        (400, with the numbers and the field that asked for them) what is over the configured budget,
        before it reaches a worker. `prompt_tokens`: every prompt of the request, summed; vLLM computes
        them once per sequence of `n` (each its own engine request)."""
        asked_by = prompt_logprobs_source(request)
        if asked_by is None:
            return
        vocab = model.tokenizer.vocab_size
        budget = self.settings.scoring_budget
        n = sequences_per_prompt(request)
        logits = prompt_tokens * n * vocab
        if logits > budget:
            each = f", computed for each of the n = {n} sequences," if n > 1 else ""
            times = f" x {n}" if n > 1 else ""
            raise InvalidRequest(
                f"{SCORING_CAUSES[asked_by]} for {prompt_tokens} prompt tokens{each} need {logits:,} logits "
                f"({prompt_tokens}{times} x a vocabulary of {vocab:,}); this gateway allows {budget:,} per "
                f"request (at most {budget // vocab:,} prompt tokens x n for this model).",
                param=asked_by,
                code="scoring_budget_exceeded",
            )

    @staticmethod
    def context_of(model: ServedModel) -> int:
        """The model's context length; unknown only while no worker has answered yet."""
        context = model.max_model_len
        if context is None:  # no worker has answered a probe yet: as good as none healthy
            raise model.pool.unavailable()
        return context

    def completion_body(
        self,
        model: ServedModel,
        prompts: list[list[int]],
        requested_max_tokens: int | None,
        params: dict[str, Any],
        stream: bool,
        prompt_param: str = "prompt",
    ) -> dict[str, Any]:
        """The body for a worker's /v1/completions, with max_tokens fitted to the context (`prompt_param`:
        where the prompt came from, for errors)."""
        context = self.context_of(model)
        longest = max(len(ids) for ids in prompts)
        cap = self.settings.default_max_tokens
        max_tokens = fit_max_tokens(longest, requested_max_tokens, context, cap, prompt_param)
        body: dict[str, Any] = {
            **params,
            "model": model.name,
            "prompt": prompts[0] if len(prompts) == 1 else prompts,
            "max_tokens": max_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    async def generate(
        self,
        model: ServedModel,
        body: Body,
        record: RequestRecord,
        sequences: int = 1,
        path: str = COMPLETIONS_PATH,
        hint: RouteHint = NO_HINT,
        charge: Charge | None = None,
    ) -> Answer:
        """A non-streamed request to a worker, holding slots for `sequences` while it runs (and, with
        a `charge`, the most it may use of its key's token budget: settled with what it used)."""
        await self._reserve(charge)
        try:
            lease, answer, span = await self._with_failover(
                model, sequences, hint, record,
                lambda worker, headers: self.transport.complete(worker, path, body, headers),
            )  # fmt: skip
            record.upstream_ended()
            lease.worker.progress_at = time.monotonic()  # a sign of progress for health checks
            self._release(model, lease)
            record.set_usage(answer.usage)
            if span is not None:
                record.finish_reasons = _describe_answer(span, answer)
                span.end()
            record.token_sent()  # a whole answer: its first token reaches the client now
            return answer
        finally:
            self._settle(charge, record)

    async def stream(
        self,
        model: ServedModel,
        body: Body,
        record: RequestRecord,
        translator: StreamTranslator | None,
        forward_usage: bool = True,
        sequences: int = 1,
        path: str = COMPLETIONS_PATH,
        fmt: StreamFormat = OPENAI_STREAM,
        hint: RouteHint = NO_HINT,
        charge: Charge | None = None,
    ) -> Response:
        """A streamed request: errors before the first byte are ordinary error responses (after
        one retry on another replica); after it, the stream format's error event (and `[DONE]`).
        A `None` translator passes the worker's events through. A `charge` holds the most the request
        may use of its key's token budget until the stream ends, however it ends."""
        await self._reserve(charge)
        try:
            lease, stream, span = await self._with_failover(
                model, sequences, hint, record,
                lambda worker, headers: self._open_stream(worker, path, body, fmt, headers),
            )  # fmt: skip
        except BaseException:
            self._settle(charge, record)
            raise
        self.streams.add(stream)

        async def close() -> None:
            try:
                self.streams.discard(stream)
                await stream.close()
                record.upstream_ended()
                self._release(model, lease)
                if span is not None:
                    span.end()
            finally:
                self._settle(charge, record)

        relay = Relay(lease.worker, record, translator, forward_usage, fmt)
        return RelayResponse(relay, stream.blocks(), on_close=close)

    async def _reserve(self, charge: Charge | None) -> None:
        if charge is not None and self.tenants is not None:
            await self.tenants.reserve(charge)

    def _settle(self, charge: Charge | None, record: RequestRecord) -> None:
        if charge is not None and self.tenants is not None:
            self.tenants.settle(charge, record)

    async def _open_stream(
        self, worker: Worker, path: str, body: Body, fmt: StreamFormat, headers: dict[str, str] | None
    ) -> WatchedStream:
        """Open a worker stream under its deadlines: the first event (headers included) within the
        first-token limit, then no gap over the idle limit."""
        settings = self.settings
        opened = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout_at(opened + settings.first_token_timeout):
                stream = await self.transport.stream(worker, path, body, fmt.done_marker, headers)
        except TimeoutError as exc:
            raise no_token_in_time(
                worker, False, settings.idle_token_timeout, settings.first_token_timeout
            ) from exc
        return WatchedStream(stream, opened, settings.first_token_timeout, settings.idle_token_timeout)

    async def _with_failover(
        self, model: ServedModel, sequences: int, hint: RouteHint, record: RequestRecord, send: Send[T]
    ) -> tuple[Lease, T, Any]:
        """`send` on a worker of the model's pool; if that worker fails before it could produce
        anything, once more on another healthy replica (or, for a connection the worker had already
        closed, on the same one). Returns the lease (the caller releases it with `_release`), what
        `send` returned, and the attempt's trace span (the caller ends it; None with tracing off)."""
        pool = model.pool
        model.usage.requests += 1  # until `_release` (an adapter is unloaded only once this is 0)
        if record.span is not None and model.adapter is not None:
            record.span.set_attribute("gateway.adapter", model.adapter.name)
        lease: Lease | None = None
        try:
            lease = await self._acquire(model, sequences, hint, record)
            try:
                return lease, *await self._attempt(model, lease, record, send)
            except (UpstreamUnavailable, UpstreamTimeout) as exc:
                if exc.eject:
                    lease.worker.eject(exc)
                exclude = self._retry_exclusion(pool, lease.worker, exc)
                pool.release(lease)
                lease = None
                lease = await self._acquire(model, sequences, hint, record, exclude)
                return lease, *await self._attempt(model, lease, record, send)
        except BaseException:
            if lease is not None:
                pool.release(lease)
            model.usage.requests -= 1
            raise

    def _release(self, model: ServedModel, lease: Lease) -> None:
        """The request behind `lease` is over: its slots go back."""
        model.pool.release(lease)
        model.usage.requests -= 1

    async def _attempt(
        self, model: ServedModel, lease: Lease, record: RequestRecord, send: Send[T]
    ) -> tuple[T, Any]:
        """One call to a worker: counted as upstream time and, with tracing on, a client span whose
        context the worker gets in `traceparent` (vLLM's own span becomes its child)."""
        span = headers = None
        tracing = self.tracing
        if record.span is not None and tracing is not None:
            attributes = {
                "gen_ai.operation.name": _operation(record),
                "gen_ai.provider.name": "vllm",
                "gen_ai.request.model": model.name,
                "server.address": lease.worker.url,
                "gateway.worker": lease.worker.label,
                "gateway.routing.reason": lease.reason.value,
            }
            if model.adapter is not None:
                attributes["gateway.adapter"] = model.adapter.name
            span = tracing.client_span(record.span, f"{_operation(record)} {model.name}", attributes)
            headers = tracing.headers_for(span)
        record.upstream_started()

        async def generate() -> T:
            record.sent = True  # past its adapter's load, if any: only now may the worker use anything
            try:
                return await send(lease.worker, headers)
            except UpstreamRejected:
                record.sent = False  # refused before it did anything (a 4xx: an adapter it lost, a field)
                raise
            except (UpstreamUnavailable, UpstreamTimeout) as exc:
                if exc.retryable:  # failed before the worker could have produced anything
                    record.sent = False
                raise

        try:
            if model.adapter is None:
                return await generate(), span
            loading = AdapterOnWorker(self.loads, model.adapter.target, lease.worker)
            return await loading.send(generate, lambda: self.span(record, LOAD_SPAN)), span
        except BaseException as exc:
            record.upstream_ended()
            if span is not None and tracing is not None:
                tracing.fail(span, exc)
                span.end()
            raise

    @staticmethod
    def _retry_exclusion(
        pool: ModelPool, failed: Worker, exc: UpstreamUnavailable | UpstreamTimeout
    ) -> frozenset[Worker]:
        """Which workers the retry must avoid; raises `exc` when there is no retry to make."""
        if not exc.retryable:
            raise exc
        others = any(w.healthy and w is not failed for w in pool.workers)
        if others:
            log.warning("worker %s failed (%s); retrying on another replica", failed.label, exc.message)
            return frozenset({failed})
        if exc.stale:
            log.info("worker %s closed a pooled connection; retrying on it", failed.label)
            return frozenset()
        raise exc

    async def _acquire(
        self,
        model: ServedModel,
        sequences: int,
        hint: RouteHint,
        record: RequestRecord,
        exclude: frozenset[Worker] = frozenset(),
    ) -> Lease:
        """Slots on a worker of the model's pool; counted under the served name (an adapter's own)."""
        pool = model.pool
        started = time.perf_counter()
        with self.span(record, "gateway.queue") as span:
            lease = await pool.acquire(sequences, exclude, hint)
            if span is not None:
                span.set_attribute("gateway.worker", lease.worker.label)
                span.set_attribute("gateway.routing.reason", lease.reason.value)
        metrics, name = self.metrics, model.name
        metrics.child(metrics.queue_wait, name).observe(time.perf_counter() - started)
        metrics.child(metrics.routing_decisions, name, pool.policy.value, lease.reason.value).inc()
        if lease.prefix_tokens:
            metrics.child(metrics.routing_prefix_tokens, name).inc(lease.prefix_tokens)
            metrics.child(metrics.routing_prefix_hit_tokens, name).inc(lease.hit_tokens)
        return lease

    @staticmethod
    def route_hint(
        model: ServedModel, ctx: RequestContext, tokens: Sequence[int] | None = None, user: str | None = None
    ) -> RouteHint:
        """What the pool's routing policy needs of this request: its prompt's token ids for `prefix`,
        its session key (the session header, else the `user` field) for `session`; its adapter, which
        every policy weighs; and its API key, whose turn in the model's queue it waits for."""
        policy = model.pool.policy
        adapter = model.adapter.name if model.adapter is not None else None
        caller = ctx.caller.key_id
        if policy is RoutingPolicy.PREFIX and tokens:
            return RouteHint(tokens=tokens, salt=ctx.caller.salt, adapter=adapter, caller=caller)
        if policy is RoutingPolicy.SESSION:
            return RouteHint(session=ctx.session or user, adapter=adapter, caller=caller)
        if adapter is None and caller is None:
            return NO_HINT
        return RouteHint(adapter=adapter, caller=caller)


def _operation(record: RequestRecord) -> str:
    """The GenAI operation name of a request (its span's name is `<operation> <model>`)."""
    return "text_completion" if record.endpoint in ("complete", "v1_completions") else "chat"


def _describe_answer(span: Any, answer: Answer) -> list[str]:
    """A whole answer's GenAI attributes on its attempt span (read from its bytes, never parsed
    whole); its finish reasons."""
    answer_id, model, reasons = answer.summary()
    usage = answer.usage or {}
    if answer_id:
        span.set_attribute("gen_ai.response.id", answer_id)
    if model:
        span.set_attribute("gen_ai.response.model", model)
    if usage:
        span.set_attribute(
            "gen_ai.usage.input_tokens", int(usage.get("prompt_tokens") or usage.get("input_tokens") or 0)
        )
        span.set_attribute(
            "gen_ai.usage.output_tokens",
            int(usage.get("completion_tokens") or usage.get("output_tokens") or 0),
        )
    if reasons:
        span.set_attribute("gen_ai.response.finish_reasons", reasons)
    return reasons

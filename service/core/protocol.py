"""Request and response models of the native (`/complete`, `/chat`) and OpenAI-compatible APIs.

Requests forbid unknown fields so typos fail loudly. Each request translates itself into the
sampling part of the body sent to a worker's `/v1/completions`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator
from pydantic_core import PydanticCustomError

# The type of a validation error that is a rule of the gateway's own, not one vLLM has: on /v1 it is
# answered in the gateway's envelope, every other validation error as vLLM words it.
GATEWAY_RULE = "gateway_rule"
# Every list and object a request may hold stops validating at its first bad item: a 4 MiB body
# holds two million one-byte items, and one error each is seconds of work and gigabytes
# (`tests/unit/test_body_parse.py` checks that no field of any endpoint's body goes without it).
FAIL_FAST = Field(fail_fast=True)


def gateway_rule(message: str) -> PydanticCustomError:
    """A validation error for a rule of the gateway's own (see GATEWAY_RULE)."""
    return PydanticCustomError(GATEWAY_RULE, message)


def _valid_unicode(value: str) -> str:
    """JSON can carry lone surrogates (`"\\ud800"`), which are not text: refuse them here rather than
    fail in the tokenizer (or while writing an error message that echoes them)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = f"is not valid Unicode text (a lone surrogate at position {exc.start})"
        raise gateway_rule(message) from None
    return value


Text = Annotated[str, AfterValidator(_valid_unicode)]

PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ROLE_RULE = (
    "a role is a plain name: 1 to 64 letters, digits, '_', '.' or '-' "
    "(system, user, assistant, developer, tool, ipython, function, ...)"
)


def is_plain_name(text: str) -> bool:
    """1 to 64 letters, digits, `_`, `.` or `-`: what roles, types and tool names are."""
    return PLAIN_NAME.fullmatch(text) is not None


def _plain_role(value: str) -> str:
    """Roles are names a template compares and writes: refuse anything else (a role that held
    `<|im_end|>` and a newline would write a turn of its own)."""
    if not is_plain_name(value):
        raise gateway_rule(ROLE_RULE)
    return value


Role = Annotated[str, AfterValidator(_plain_role)]

StopField = Annotated[
    Text | Annotated[list[Annotated[Text, Field(min_length=1)]], FAIL_FAST] | None,
    Field(default=None, description="Sequence(s) that end generation; not included in the output."),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(Strict):
    """One turn of a conversation; content is text (a string or text parts). Any role the model's
    chat template accepts (`system`, `user`, `assistant`, `developer`, `tool`, ...), as a plain name."""

    role: Role
    content: Text | Annotated[list[TextPart], FAIL_FAST]
    name: Text | None = None


class Sampling(Strict):
    """Sampling fields shared by every generation endpoint."""

    model: Text | None = Field(default=None, description="Served model name; defaults by endpoint kind.")
    max_tokens: int | None = Field(
        default=None, ge=1, description="Tokens to generate; omitted: the rest of the context, capped."
    )
    temperature: float | None = Field(default=None, ge=0, le=100, description="0 is greedy.")
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1, description="-1 or 0 disables top-k.")
    stop: StopField = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = Field(default=1, ge=1, description="Completions per request (at most GATEWAY_MAX_N).")
    stream: bool = False
    return_token_ids: bool | None = Field(
        default=None, description="Also return the prompt token ids the worker received (and output ids)."
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        # How many: GATEWAY_MAX_STOP, the one limit a client meets (service.core.caps).
        if value == "":
            raise ValueError("stop sequence must not be empty")
        return value

    # Fields the gateway itself consumes; everything else set by the client goes to the worker.
    GATEWAY_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"model", "stream", "stream_options", "max_tokens", "max_completion_tokens", "user",
         "prompt", "examples", "layout", "messages", "top_logprobs", "continuation"}
    )  # fmt: skip

    def engine_params(self) -> dict[str, Any]:
        """Sampling fields as vLLM's /v1/completions expects them (unset ones left out)."""
        return self.model_dump(exclude_unset=True, exclude=set(self.GATEWAY_FIELDS))


# ---------------------------------------------------------------- native API


class Example(Strict):
    """One demonstration of the pattern a base model should continue."""

    input: Text
    output: Text


MAX_LAYOUT_CHARS = 1000


class FewShotLayout(Strict):
    """How examples become a prompt: `{input_prefix} {input}`, newline, `{output_prefix} {output}`.
    Each part is repeated once per example, so each is short (and the built prompt is counted)."""

    input_prefix: Text = Field("Input:", max_length=MAX_LAYOUT_CHARS)
    output_prefix: Text = Field("Output:", max_length=MAX_LAYOUT_CHARS)
    separator: Text = Field("\n\n", max_length=MAX_LAYOUT_CHARS)


class CompleteRequest(Sampling):
    """POST /complete: continue `prompt`, optionally after few-shot `examples`."""

    prompt: Text = Field(
        min_length=1, description="Text to continue (the new input when examples are given)."
    )
    examples: Annotated[list[Example], FAIL_FAST] | None = Field(default=None, max_length=256)
    layout: FewShotLayout = Field(default_factory=FewShotLayout)
    continuation: Text | None = Field(
        default=None,
        min_length=1,
        description="Score this text instead of generating: the loglikelihood of `continuation` after the "
        "prompt (per-token logprobs and their sum), the primitive of evaluation harnesses.",
    )


class ChatRequest(Sampling):
    """POST /chat: the next assistant turn of `messages` (at most GATEWAY_MAX_MESSAGES)."""

    messages: Annotated[list[ChatMessage], FAIL_FAST] = Field(min_length=1)


class RenderRequest(Strict):
    """POST /chat/render: the exact prompt a /chat request would produce."""

    model: Text | None = None
    messages: Annotated[list[ChatMessage], FAIL_FAST] = Field(min_length=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Choice(BaseModel):
    index: int
    text: str
    finish_reason: str | None


class ScoredToken(BaseModel):
    id: int
    text: str
    logprob: float
    rank: int | None


class ScoreResponse(BaseModel):
    """/complete with `continuation`: how likely the model finds it after the prompt."""

    id: str
    model: str
    loglikelihood: float = Field(description="Sum of the continuation tokens' logprobs.")
    is_greedy: bool = Field(description="Whether greedy decoding would have produced the continuation.")
    tokens: list[ScoredToken]
    usage: Usage
    context_tokens: int = Field(description="Tokens of the prompt before the continuation.")


class CompleteResponse(BaseModel):
    id: str
    model: str
    text: str
    finish_reason: str | None
    usage: Usage
    choices: list[Choice] = Field(description="Every completion when n > 1 (the first is also `text`).")
    prompt_token_ids: list[int] | None = Field(default=None, description="With return_token_ids.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None


class ChatResponse(BaseModel):
    id: str
    model: str
    message: AssistantMessage
    finish_reason: str | None
    usage: Usage
    choices: list[ChatChoice] = Field(description="Every reply when n > 1 (the first is also `message`).")
    prompt_token_ids: list[int] | None = Field(default=None, description="With return_token_ids.")


class RenderResponse(BaseModel):
    model: str
    prompt: str
    token_ids: list[int]
    num_tokens: int


# ---------------------------------------------------------------- OpenAI-compatible API
#
# These declare only the fields the gateway acts on (routing, tokenizing, context and caps,
# streaming, admission); everything else a client sends is kept as it came and forwarded to the
# worker, if the worker's own schema has it (service.workers.contract). Types of the fields not declared
# here are the worker's to check, so its error reaches the client exactly as vLLM words it.


class Passthrough(BaseModel):
    """A request whose undeclared fields are kept for the worker, and whose bytes are kept too: when
    nothing in it changes on the way, the worker gets them exactly as the client sent them."""

    model_config = ConfigDict(extra="allow")
    _raw: bytes | None = PrivateAttr(default=None)

    def keep_raw(self, raw: bytes) -> None:
        self._raw = raw

    @property
    def body_bytes(self) -> int | None:
        """The size of the body it was read from (None when built in code)."""
        return None if self._raw is None else len(self._raw)

    def extras(self) -> list[str]:
        """The fields sent that the gateway does not declare (the worker's schema must have them)."""
        return list(self.model_extra or ())

    def body(self, model: str) -> dict[str, Any]:
        """The request as the worker receives it: as sent, with the served model name."""
        return {**self.model_dump(exclude_unset=True), "model": model}

    def as_sent(self, model: str) -> dict[str, Any] | bytes:
        """The client's own bytes when they already name the served model, else `body`."""
        if self._raw is not None and self.__dict__.get("model") == model:
            return self._raw
        return self.body(model)


class StreamOptions(Passthrough):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class OpenAIRequest(Passthrough):
    """Fields every OpenAI-style generation request shares: only those the gateway reads, typed as vLLM
    types them and with none of vLLM's range checks (a value vLLM refuses reaches the worker, which
    refuses it in its own words: `seed`, say, is not declared at all)."""

    model: Text | None = Field(default=None, description="Served model name; defaults by endpoint kind.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=1, description="Completions per prompt (at most GATEWAY_MAX_N).")
    stop: Text | Annotated[list[Text], FAIL_FAST] | None = None
    prompt_logprobs: int | None = None
    echo: bool | None = None

    @property
    def choices(self) -> int:
        """Completions asked for per prompt."""
        return self.n or 1


def _int32(value: int) -> int:
    """Token ids are hashed and counted as 32-bit values (no vocabulary comes near)."""
    if value >= 2**31:
        raise gateway_rule(f"token id {value} is over 2,147,483,647, more than any vocabulary holds")
    return value


TokenId = Annotated[int, Field(ge=0), AfterValidator(_int32)]
# A 4 MiB body holds two million ids: validation stops at the first bad item (else one error each,
# seconds of work for a body of -1s) and the union's members each give up at once.
TokenIds = Annotated[list[TokenId], Field(fail_fast=True)]
# In vLLM's order, so a refusal lists its errors as vLLM does.
PromptField = (
    TokenIds
    | Annotated[list[TokenIds], Field(fail_fast=True)]
    | Text
    | Annotated[list[Text], Field(fail_fast=True)]
)


class V1CompletionRequest(OpenAIRequest):
    """POST /v1/completions (vLLM's CompletionRequest)."""

    prompt: PromptField | None = None  # none, or empty: vLLM decides (and refuses it in its words)
    max_tokens: int | None = None
    logprobs: int | None = None
    add_special_tokens: bool | None = True
    truncate_prompt_tokens: int | None = None

    @property
    def prompts(self) -> int:
        """How many prompts: a text or a list of ids is one, a list of texts or id lists holds several."""
        prompt = self.prompt
        return len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1

    @property
    def empty_prompt(self) -> bool:
        """No prompt, or an empty one (a batch with an empty item among others is counted as any batch:
        vLLM generates for it on a model whose tokenizer adds BOS)."""
        return not self.prompt


class ContentPart(Passthrough):
    type: Text | None = None  # none: vLLM goes by the part's keys
    text: Text | None = None


class Message(Passthrough):
    """One chat message as OpenAI and vLLM take it: any role the template accepts (a plain name),
    content as text, parts, or nothing (an assistant turn that only calls tools); other fields
    (tool_calls, tool_call_id, name, reasoning) are kept."""

    role: Role
    content: Text | Annotated[list[ContentPart], FAIL_FAST] | None = None


class ChatOptionsFields(BaseModel):
    """vLLM's fields that change how a conversation is rendered."""

    tools: Annotated[list[dict[str, Any]], FAIL_FAST] | None = None
    documents: Annotated[list[dict[str, Any]], FAIL_FAST] | None = None
    chat_template: Text | None = None
    chat_template_kwargs: Annotated[dict[str, Any], FAIL_FAST] | None = None
    add_generation_prompt: bool | None = True
    continue_final_message: bool | None = False
    add_special_tokens: bool | None = False


class V1ChatRequest(ChatOptionsFields, OpenAIRequest):
    """POST /v1/chat/completions (vLLM's ChatCompletionRequest)."""

    messages: Annotated[list[Message], FAIL_FAST]  # how many: GATEWAY_MAX_MESSAGES; none: vLLM decides
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        """`max_completion_tokens` (the current name) or `max_tokens` (the deprecated one)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class V1BatchChatRequest(ChatOptionsFields, OpenAIRequest):
    """POST /v1/chat/completions/batch: several conversations answered in one call."""

    # how many: GATEWAY_MAX_PROMPTS, each GATEWAY_MAX_MESSAGES
    messages: Annotated[list[Annotated[list[Message], FAIL_FAST]], FAIL_FAST]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class V1ResponsesRequest(Passthrough):
    """POST /v1/responses (OpenAI's Responses API, which vLLM serves for instruct models)."""

    model: Text | None = None
    input: Text | Annotated[list[dict[str, Any]], FAIL_FAST]
    instructions: Text | None = None
    stream: bool | None = False
    max_output_tokens: int | None = None
    top_logprobs: int | None = None


class TokenizeRequest(ChatOptionsFields, Passthrough):
    """POST /tokenize: a prompt (vLLM's TokenizeCompletionRequest) or messages (TokenizeChatRequest)."""

    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[Message], FAIL_FAST] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = False


class DetokenizeRequest(Passthrough):
    """POST /detokenize (vLLM's DetokenizeRequest)."""

    model: Text | None = None
    tokens: TokenIds  # how many: GATEWAY_MAX_DETOKENIZE_TOKENS

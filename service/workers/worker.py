"""One vLLM worker as the gateway sees it: where it is, whether it answers, how busy it is (by the
gateway's own count and by the engine's), whether it still makes progress, and what it told us about
itself."""

from __future__ import annotations

import logging
from dataclasses import InitVar, dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def address_of(url: str) -> str:
    """`host:port` of a worker URL, for logs."""
    return url.removeprefix("http://").removeprefix("https://")


@dataclass(frozen=True)
class EngineLoad:
    """What the worker's own `/metrics` said at the last health check (None: it did not say)."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None  # 0..1
    prefix_cache_queries: float | None = None  # tokens looked up in the prefix cache, since start
    prefix_cache_hits: float | None = None  # of which found
    block_size: int | None = None  # tokens per KV-cache block
    # LoRA adapters its engine is running or has waiting (`vllm:lora_requests_info`).
    lora_running: frozenset[str] = frozenset()
    lora_waiting: frozenset[str] = frozenset()

    @property
    def requests(self) -> int:
        """Requests the engine holds (running plus waiting), across every gateway that feeds it."""
        return int((self.running or 0) + (self.waiting or 0))


@dataclass(eq=False)
class Worker:
    """One vLLM OpenAI server: where it is, whether it answers, how busy it is, what it told us."""

    model: str
    url: str
    name: str = ""  # stable label for logs and metrics; embedded workers keep theirs across restarts
    up: InitVar[bool] = False
    outstanding: int = 0  # sequences admitted and not yet finished
    max_model_len: int | None = None
    picked: int = 0  # when it was last picked (a pool-wide count), to share load among equals
    failed_checks: int = 0  # consecutive failed health checks
    seen_healthy: bool = False  # healthy at least once since it was (re)started
    facts: dict[str, Any] = field(default_factory=dict)  # what the worker told us (see facts.py)
    facts_read: dict[str, float] = field(default_factory=dict)  # fact reader -> when it last succeeded
    facts_failing: set[str] = field(default_factory=set)  # fact readers failing now (logged once)
    engine: EngineLoad = field(default_factory=EngineLoad)  # refreshed by every health check
    others: int = 0  # requests the engine held beyond this gateway's own, at the last check
    pid: int | None = None  # its process on this host (embedded workers), for signs of progress
    # Times below are on the monotonic clock (asyncio's and uvloop's `loop.time()` are the same).
    progress_at: float = 0.0  # when bytes last arrived from it on a request
    answered_at: float = 0.0  # when it last answered a health probe
    checked_at: float = 0.0  # when its last health verdict was made
    probe_timeout: float | None = None  # its next probe's limit (None: the configured one)
    # LoRA adapters it holds, name -> folder: what its /v1/models lists, and what the gateway loaded since.
    adapters: dict[str, str] = field(default_factory=dict)

    def __post_init__(self, up: bool) -> None:
        if not self.name:
            self.name = address_of(self.url)
        self._healthy = up

    @property
    def healthy(self) -> bool:
        """Whether requests may go to it: its last verdict (written only through `mark`)."""
        return self._healthy

    @property
    def load(self) -> int:
        """Sequences it is busy with: this gateway's own count (exact, current) plus what the engine
        held beyond it at the last check (other gateway processes' and pods' requests)."""
        return self.outstanding + self.others

    def observe_engine(self, engine: EngineLoad) -> None:
        """What the worker's `/metrics` just said; the part of its load that is not this gateway's is
        what it holds beyond our own outstanding count (never below zero: answers in transit)."""
        self.engine = engine
        self.others = max(0, engine.requests - self.outstanding)

    def affinity(self, adapter: str) -> int:
        """How ready it is to serve `adapter`: 2 its engine runs it (or has it waiting) now, 1 it holds it
        loaded, 0 it would have to load it first."""
        engine = self.engine
        if adapter in engine.lora_running or adapter in engine.lora_waiting:
            return 2
        return 1 if adapter in self.adapters else 0

    @property
    def label(self) -> str:
        """Short stable name for logs and metrics."""
        return self.name

    def move(self, url: str) -> None:
        """A new process now serves this replica at `url`: nothing it answered before holds, and
        what it told us about itself is read again (kept meanwhile: the same model, most likely)."""
        self.url = url
        self.pid = None  # until its new process is known
        self.mark(False)
        self.seen_healthy = False
        self.failed_checks = 0
        self.observe_engine(EngineLoad())
        self.adapters.clear()  # a new process holds no adapter
        self.facts_read.clear()
        self.progress_at = self.answered_at = 0.0
        self.probe_timeout = None

    def mark(self, healthy: bool) -> None:
        """Record a health verdict (a probe's, or a transport failure's)."""
        if healthy != self._healthy:
            log.info("worker %s for %s is %s", self.label, self.model, "up" if healthy else "down")
        self._healthy = healthy
        self.seen_healthy = self.seen_healthy or healthy

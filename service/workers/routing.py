"""Which replica a request should go to: the routing policies.

`prefix` (the default with two or more replicas) sends requests that share a prompt prefix to the
replica that most likely still holds that prefix in vLLM's prefix cache, so it is not prefilled again:

- The prompt's token ids are cut into blocks of the engine's KV-cache block size (read from the
  worker's `vllm:cache_config_info`), and each block gets a chained hash (a hash of every token up to
  the end of that block), as vLLM's own prefix cache does; only whole blocks can be cached.
- Each pool remembers (bounded, least recently used first out) which replica each chained hash went
  to; the replica holding the longest run of the prompt's blocks is preferred.
- With API keys configured, the hashes are keyed by the request's cache salt (see
  `service.core.tenancy`), as vLLM keys its own block hashes by it: the same prompt from two cache
  groups is two unrelated prefixes, placed independently, and no group's request is steered to the
  replica holding another group's prefix. Without a salt the hashes are unkeyed, as before.
- A prefix seen nowhere goes to the replica chosen by rendezvous hashing (highest random weight) of
  the hash of its first blocks and the replicas' stable names. That choice needs no memory, so every
  gateway process and every gateway pod sends a new prefix to the same replica, and when a replica
  goes, only its own prefixes move.
- Bounded load (consistent hashing with bounded loads, Mirrokni et al. 2018): a replica is preferred
  only while its load stays within `balance_factor` x the mean, so one hot prefix cannot pile onto one
  replica; the rest spills to the least loaded. Load is the gateway's own count of outstanding
  sequences (exact) plus what the engine held beyond it at the last health check (its running + waiting
  requests, scraped from its `/metrics`: the traffic of other gateway processes and pods); a replica
  whose KV cache is nearly full is not preferred either.

`session` does the same rendezvous choice on a session key (the `X-Session-Id` header, else the
request's `user` field), bounded the same way. `least_outstanding` picks the least loaded replica,
`random` any healthy one.

A request for a LoRA adapter prefers, whatever the policy, the replicas that hold it: first those whose
engine runs it now (`vllm:lora_requests_info`), then those that have it loaded, each group in the
policy's order; an adapter held nowhere goes to its own rendezvous replica (every gateway process
loads it on the same one). Bounded load still rules, so a hot adapter spreads to more replicas. Its
prefix hashes include the adapter's name: vLLM's KV blocks computed with one adapter are not another's.
With a model's `adapter_affinity` off, adapter requests are routed by the policy alone (and the adapter
loaded wherever they land): the baseline `bench/adapter_routing.py` compares affinity with.
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from service.ops.settings import RoutingPolicy
from service.workers.worker import Worker

DEFAULT_BLOCK_SIZE = 16  # vLLM's default on GPUs; the worker's own size replaces it once read
KEY_TOKENS = 256  # a new prefix is placed by the hash of (at most) its first this-many tokens
KV_CACHE_FULL = 0.95  # a replica whose KV cache is this full is not preferred


class Reason(StrEnum):
    """Why a replica was chosen (a label of `gateway_routing_decisions_total`)."""

    PREFIX_MATCH = "prefix_match"  # it holds the longest run of the prompt's blocks
    PREFIX_HASH = "prefix_hash"  # a prefix seen nowhere yet: its rendezvous replica
    SESSION = "session"  # the session's rendezvous replica
    SPILL = "spill"  # the preferred replica was over its load bound or full: the least loaded
    LEAST_OUTSTANDING = "least_outstanding"  # the policy, or nothing to hash (short prompt, no session)
    RANDOM = "random"
    ADAPTER = "adapter"  # it holds the request's adapter (the policy would have chosen another)
    ADAPTER_HASH = "adapter_hash"  # an adapter held nowhere: its rendezvous replica


@dataclass(frozen=True)
class RouteHint:
    """What a request offers for routing: its prompt's token ids, its session key, the cache salt its
    prompt is cached under on the worker (None: unsalted), the LoRA adapter it runs with (if any), and
    its API key's id (keys take turns in a model's queue; None: no key)."""

    tokens: Sequence[int] | None = None
    session: str | None = None
    salt: str | None = None
    adapter: str | None = None
    caller: str | None = None


NO_HINT = RouteHint()


@dataclass
class Route:
    """Replicas in order of preference, why the first one is first, and what to learn once one is taken."""

    order: list[Worker]
    reason: Reason
    preferred: Worker | None = None  # the prefix's or session's own replica, before load was weighed
    blocks: list[int] = field(default_factory=list)  # chained block hashes of the prompt
    matched: dict[Worker, int] = field(default_factory=dict)  # blocks each replica is known to hold

    def reason_for(self, chosen: Worker) -> Reason:
        """The reason for the replica actually taken (it may not be the first: the first was full)."""
        if self.preferred is not None and chosen is not self.preferred:
            return Reason.SPILL
        return self.reason


def block_hashes(
    tokens: Sequence[int],
    block_size: int,
    max_tokens: int,
    salt: str | None = None,
    adapter: str | None = None,
) -> list[int]:
    """Chained hashes of the whole blocks among the first `max_tokens` tokens: block i's hash covers
    every token up to the end of block i (and the salt, as blake2b's key: unrelated hashes per salt; and
    the adapter, hashed first: unrelated hashes per adapter). blake2b, not Python's `hash`, so every
    process agrees."""
    whole = min(len(tokens), max_tokens) // block_size * block_size
    if whole == 0:
        return []
    data = array("i", tokens[:whole]).tobytes()
    step = block_size * 4
    hasher = hashlib.blake2b(digest_size=8, key=salt.encode()[:64] if salt else b"")
    if adapter:
        hasher.update(b"lora\x00" + adapter.encode() + b"\x00")
    hashes = []
    for start in range(0, len(data), step):
        hasher.update(data[start : start + step])
        hashes.append(int.from_bytes(hasher.copy().digest(), "little"))
    return hashes


def rendezvous(key: bytes, workers: Sequence[Worker]) -> list[Worker]:
    """`workers` ordered by highest random weight for `key` (stable across processes and hosts)."""

    def weight(worker: Worker) -> bytes:
        return hashlib.blake2b(key + worker.name.encode(), digest_size=8).digest()

    return sorted(workers, key=weight, reverse=True)


class PrefixIndex:
    """Which replicas recent block hashes went to, the least recently used forgotten first. Keyed by
    worker URL, so a replica restarted on a new port (its cache empty) matches nothing."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[int, set[str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def matches(self, blocks: Sequence[int], workers: Sequence[Worker]) -> dict[Worker, int]:
        """How many leading blocks each replica is known to hold (replicas holding none left out)."""
        by_url = {worker.url: worker for worker in workers}
        matched: dict[Worker, int] = {}
        for depth, block in enumerate(blocks, start=1):
            holders = self._holders.get(block)
            if not holders:
                break
            found = False
            for url in holders:
                worker = by_url.get(url)
                if worker is not None and matched.get(worker, 0) == depth - 1:
                    matched[worker] = depth
                    found = True
            if not found:
                break
        return matched

    def learn(self, blocks: Sequence[int], worker: Worker) -> None:
        """`worker` now holds these blocks."""
        holders = self._holders
        for block in blocks:
            entry = holders.get(block)
            if entry is None:
                holders[block] = {worker.url}
            else:
                entry.add(worker.url)
                holders.move_to_end(block)
        while len(holders) > self.capacity:
            holders.popitem(last=False)


@dataclass(frozen=True)
class RoutingConfig:
    """A pool's routing settings."""

    policy: RoutingPolicy = RoutingPolicy.AUTO
    max_prefix_tokens: int = 8192
    balance_factor: float = 1.25
    index_blocks: int = 65_536
    adapter_affinity: bool = True  # off: an adapter's requests go where the policy alone sends them


class Router:
    """Orders a pool's healthy replicas for one request under the pool's policy."""

    def __init__(self, config: RoutingConfig) -> None:
        self.config = config
        self.index = PrefixIndex(config.index_blocks)

    def policy_for(self, replicas: int) -> RoutingPolicy:
        """The policy in force: `auto` is `prefix` with two or more replicas."""
        if self.config.policy is RoutingPolicy.AUTO:
            return RoutingPolicy.PREFIX if replicas > 1 else RoutingPolicy.LEAST_OUTSTANDING
        return self.config.policy

    def route(self, workers: list[Worker], cost: int, hint: RouteHint, block_size: int) -> Route:
        """`workers` (healthy, at least one) in order of preference for a request of `cost` sequences."""
        least_loaded = sorted(workers, key=lambda w: (w.load, w.outstanding, w.picked))
        if len(workers) == 1:
            return Route(least_loaded, Reason.LEAST_OUTSTANDING)
        route = self._by_policy(workers, least_loaded, cost, hint, block_size)
        if hint.adapter is None or not self.config.adapter_affinity:
            return route
        return self._adapter_first(route, workers, least_loaded, cost, hint.adapter)

    def _adapter_first(
        self, route: Route, workers: list[Worker], least_loaded: list[Worker], cost: int, adapter: str
    ) -> Route:
        """The replicas that hold `adapter` first (those running it, then those with it loaded), each
        group in the policy's order; held nowhere, its rendezvous replica first; within the load bound."""
        affinity = {worker: worker.affinity(adapter) for worker in workers}
        if not any(affinity.values()):
            ranked = rendezvous(b"lora\x00" + adapter.encode(), workers)
            preferred = Route(ranked, Reason.ADAPTER_HASH, ranked[0], route.blocks, route.matched)
            return self._bounded(preferred, least_loaded, cost)
        order = sorted(route.order, key=lambda w: -affinity[w])  # stable: the policy's order among equals
        reason = route.reason if order[0] is route.order[0] else Reason.ADAPTER
        return self._bounded(Route(order, reason, order[0], route.blocks, route.matched), least_loaded, cost)

    def _by_policy(
        self, workers: list[Worker], least_loaded: list[Worker], cost: int, hint: RouteHint, block_size: int
    ) -> Route:
        """The replicas in the order the policy prefers for this request."""
        policy = self.policy_for(len(workers))
        if policy is RoutingPolicy.LEAST_OUTSTANDING:
            return Route(least_loaded, Reason.LEAST_OUTSTANDING)
        if policy is RoutingPolicy.RANDOM:
            return Route(random.sample(workers, len(workers)), Reason.RANDOM)
        if policy is RoutingPolicy.SESSION:
            if not hint.session:
                return Route(least_loaded, Reason.LEAST_OUTSTANDING)
            ranked = rendezvous(hint.session.encode(), workers)
            return self._bounded(Route(ranked, Reason.SESSION, ranked[0]), least_loaded, cost)
        blocks = block_hashes(
            hint.tokens or (), block_size, self.config.max_prefix_tokens, hint.salt, hint.adapter
        )
        if not blocks:
            return Route(least_loaded, Reason.LEAST_OUTSTANDING)
        key_depth = max(1, min(len(blocks), KEY_TOKENS // block_size))
        ranked = rendezvous(blocks[key_depth - 1].to_bytes(8, "little"), workers)
        matched = self.index.matches(blocks, workers)
        reason = Reason.PREFIX_HASH
        if matched:
            # Longest run first; equals in their rendezvous order (which also breaks ties alike
            # across gateway processes).
            position = {worker: rank for rank, worker in enumerate(ranked)}
            ranked.sort(key=lambda w: (-matched.get(w, 0), position[w]))
            reason = Reason.PREFIX_MATCH
        route = Route(ranked, reason, ranked[0], blocks, matched)
        return self._bounded(route, least_loaded, cost)

    def _bounded(self, route: Route, least_loaded: list[Worker], cost: int) -> Route:
        """Keep the preference order among replicas within the load bound (and with room in their KV
        cache); the others follow, least loaded first."""
        workers = route.order
        bound = math.ceil(self.config.balance_factor * (sum(w.load for w in workers) + cost) / len(workers))
        within = [w for w in workers if w.load + cost <= bound and not _cache_full(w)]
        over = [w for w in least_loaded if w not in within]
        route.order = within + over
        return route

    def chosen(self, route: Route, worker: Worker) -> int:
        """`worker` took the request: remember its blocks; how many prompt tokens it likely had cached
        (its known run, in blocks of the size used) is returned for the hit estimate."""
        if route.blocks:
            self.index.learn(route.blocks, worker)
        return route.matched.get(worker, 0)


def _cache_full(worker: Worker) -> bool:
    usage = worker.engine.kv_cache_usage
    return usage is not None and usage >= KV_CACHE_FULL

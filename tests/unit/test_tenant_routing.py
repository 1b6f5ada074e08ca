"""Prefix routing with cache salts: the same prompt from two cache groups is placed independently and
matches nothing of the other's; the same group keeps its replica; without a salt nothing changes."""

from __future__ import annotations

import hashlib
from array import array

from service.core.context import RequestContext
from service.core.gateway import Gateway
from service.core.served import ServedModel
from service.core.tenancy import Caller
from service.ops.metrics import Metrics
from service.ops.record import RequestRecord
from service.ops.settings import RoutingPolicy
from service.workers.pool import ModelPool, Worker
from service.workers.routing import Reason, RouteHint, block_hashes
from tests.unit.test_routing import BLOCK, pool_of, question, replicas, tenant

SALT_A = "a" * 64
SALT_B = "b" * 64


def unkeyed_hashes(tokens: list[int], block_size: int) -> list[int]:
    """Block hashes as the router computed them before salts existed (unkeyed blake2b)."""
    whole = len(tokens) // block_size * block_size
    data = array("i", tokens[:whole]).tobytes()
    hasher = hashlib.blake2b(digest_size=8)
    hashes = []
    for start in range(0, len(data), block_size * 4):
        hasher.update(data[start : start + block_size * 4])
        hashes.append(int.from_bytes(hasher.copy().digest(), "little"))
    return hashes


async def served(pool: ModelPool, tokens: list[int], salt: str | None) -> tuple[Worker, Reason]:
    lease = await pool.acquire(hint=RouteHint(tokens=tokens, salt=salt))
    pool.release(lease)
    return lease.worker, lease.reason


def test_without_a_salt_the_hashes_are_those_of_before() -> None:
    tokens = tenant(1, 200)
    assert block_hashes(tokens, BLOCK, 10_000) == unkeyed_hashes(tokens, BLOCK)
    assert block_hashes(tokens, BLOCK, 10_000, None) == unkeyed_hashes(tokens, BLOCK)


def test_each_salt_gives_unrelated_hashes_and_the_same_salt_the_same() -> None:
    tokens = tenant(2, 200)
    plain, salted_a, salted_b = (block_hashes(tokens, BLOCK, 10_000, s) for s in (None, SALT_A, SALT_B))
    assert block_hashes(tokens, BLOCK, 10_000, SALT_A) == salted_a  # every process agrees
    assert not set(salted_a) & set(plain) and not set(salted_a) & set(salted_b)


async def test_a_cached_prefix_steers_only_its_own_groups_requests() -> None:
    pool = pool_of(replicas(4))
    system = tenant(7)
    home, reason = await served(pool, system + question(1), SALT_A)
    assert reason is Reason.PREFIX_HASH
    again, reason = await served(pool, system + question(2), SALT_A)
    assert again is home and reason is Reason.PREFIX_MATCH  # a key still finds its own cache
    _, reason = await served(pool, system + question(3), SALT_B)
    assert reason is Reason.PREFIX_HASH  # the other group's exact prefix is news: no match
    _, reason = await served(pool, system + question(3), None)
    assert reason is Reason.PREFIX_HASH


async def test_two_groups_place_the_same_prompts_independently() -> None:
    pool = pool_of(replicas(4), RoutingPolicy.PREFIX)
    prompts = [tenant(seed) for seed in range(64)]
    placed_a = [pool.pick(hint=RouteHint(tokens=p, salt=SALT_A)).name for p in prompts]
    placed_b = [pool.pick(hint=RouteHint(tokens=p, salt=SALT_B)).name for p in prompts]
    assert placed_a == [pool.pick(hint=RouteHint(tokens=p, salt=SALT_A)).name for p in prompts]  # stable
    differ = sum(a != b for a, b in zip(placed_a, placed_b, strict=True))
    # Independent choices among 4 replicas differ 3 times in 4 (48 of 64); identical ones never.
    assert 32 <= differ <= 60


def test_a_requests_route_hint_carries_its_callers_salt() -> None:
    pool = pool_of(replicas(2))
    tokens = tenant(4)
    record = RequestRecord(Metrics(lambda: []), "id", "test")
    caller = Caller(key_id="k", cache_group="key:k", salt=SALT_A)
    model = ServedModel(pool.name, pool.kind, None, pool)  # type: ignore[arg-type]  # no tokenizer needed
    assert Gateway.route_hint(model, RequestContext("id", record, caller=caller), tokens).salt == SALT_A
    assert Gateway.route_hint(model, RequestContext("id", record), tokens).salt is None  # no keys

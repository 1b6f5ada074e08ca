"""Routing policies: prefix affinity that every gateway process agrees on, bounded load, sessions."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from service.ops.settings import ModelKind, ModelSpec, RoutingPolicy
from service.workers.engine_metrics import parse_engine_load
from service.workers.pool import Capacity, ModelPool, Worker
from service.workers.routing import (
    KEY_TOKENS,
    Reason,
    RouteHint,
    Router,
    RoutingConfig,
    block_hashes,
)
from service.workers.worker import EngineLoad

SPEC = ModelSpec(name="m", kind=ModelKind.BASE, source="/m")
BLOCK = 16
FIXTURES = Path(__file__).parent / "fixtures"


def replicas(count: int, port: int = 9000) -> list[Worker]:
    return [Worker("m", f"http://w{i}:{port}", name=f"m-{i}", up=True) for i in range(count)]


def pool_of(
    workers: list[Worker], policy: RoutingPolicy = RoutingPolicy.PREFIX, **config: float
) -> ModelPool:
    router = Router(RoutingConfig(policy=policy, **config))  # type: ignore[arg-type]
    return ModelPool(SPEC, workers, Capacity(per_worker=64, queue=8, queue_timeout=1), router)


def tenant(seed: int, length: int = 1000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(length)]


def question(seed: int) -> list[int]:
    return [seed % 1000, 7, seed % 313, 9]


async def served(pool: ModelPool, tokens: list[int]) -> tuple[Worker, Reason]:
    lease = await pool.acquire(hint=RouteHint(tokens=tokens))
    pool.release(lease)
    return lease.worker, lease.reason


def test_block_hashes_chain_whole_blocks_and_agree_with_themselves() -> None:
    tokens = tenant(1, 40)
    hashes = block_hashes(tokens, BLOCK, 10_000)
    assert len(hashes) == 2  # 40 tokens: two whole blocks of 16, the rest is not cacheable
    assert block_hashes([*tokens[:32], 1, 2, 3], BLOCK, 10_000) == hashes
    changed = [tokens[0] + 1, *tokens[1:]]
    assert all(a != b for a, b in zip(block_hashes(changed, BLOCK, 10_000), hashes, strict=True))  # chained
    assert block_hashes(tokens, BLOCK, 20) == hashes[:1]  # at most max_tokens are hashed
    assert block_hashes(tokens[:15], BLOCK, 10_000) == []


async def test_the_same_prefix_goes_to_the_same_replica_in_two_independent_gateways() -> None:
    # Two pools stand for two gateway processes (or pods): separate memory, same replicas. Each sees
    # requests in its own order, so neither learned anything the other did.
    first, second = pool_of(replicas(4)), pool_of(replicas(4))
    prompts = [tenant(seed) + question(q) for seed in range(16) for q in range(3)]
    chosen_first = [(await served(first, p))[0].name for p in prompts]
    chosen_second = [(await served(second, p))[0].name for p in reversed(prompts)][::-1]
    assert chosen_first == chosen_second
    by_tenant = {tuple(prompt[:1000]): name for prompt, name in zip(prompts, chosen_first, strict=True)}
    assert len(set(by_tenant.values())) >= 3  # tenants spread over the replicas
    for prompt, name in zip(prompts, chosen_first, strict=True):
        assert by_tenant[tuple(prompt[:1000])] == name  # every question of a tenant on its replica


async def test_a_learned_prefix_is_matched_and_a_new_one_is_hashed() -> None:
    pool = pool_of(replicas(3))
    system = tenant(7)
    worker, reason = await served(pool, system + question(1))
    assert reason is Reason.PREFIX_HASH
    again, reason = await served(pool, system + question(2))
    assert again is worker and reason is Reason.PREFIX_MATCH
    assert pool.router.index.matches(block_hashes(system, BLOCK, 8192), pool.workers) == {
        worker: 1000 // BLOCK
    }


async def test_the_longest_known_run_wins_over_the_rendezvous_choice() -> None:
    # A conversation that spilled to another replica continues where its longer history is cached.
    pool = pool_of(replicas(2))
    history = tenant(3, 600)
    home = pool.pick(hint=RouteHint(tokens=history))
    other = next(w for w in pool.workers if w is not home)
    route = pool.router.route(pool.workers, 1, RouteHint(tokens=history), BLOCK)
    pool.router.chosen(route, other)  # as if it had spilled there: `other` holds all 600 tokens
    assert pool.pick(hint=RouteHint(tokens=history + question(5))) is other


async def test_a_hot_prefix_spills_beyond_the_load_bound() -> None:
    workers = replicas(2)
    pool = pool_of(workers, balance_factor=1.25)
    hot = tenant(11) + question(0)
    leases = [await pool.acquire(hint=RouteHint(tokens=hot)) for _ in range(8)]
    home = leases[0].worker
    # Bound: ceil(1.25 x (load + 1) / 2). The hot prefix stays home while within it, then spills.
    assert [lease.worker is home for lease in leases[:2]] == [True, True]
    assert sum(lease.worker is home for lease in leases) <= 5
    assert {lease.reason for lease in leases} == {Reason.PREFIX_HASH, Reason.PREFIX_MATCH, Reason.SPILL}
    assert all(lease.reason is Reason.SPILL for lease in leases if lease.worker is not home)
    for lease in leases:
        pool.release(lease)


async def test_the_engines_own_queue_counts_as_load() -> None:
    # Other gateway processes fill the home replica: its engine says 20 waiting, so this one spills.
    workers = replicas(2)
    pool = pool_of(workers)
    prompt = tenant(5) + question(0)
    home = pool.pick(hint=RouteHint(tokens=prompt))
    home.observe_engine(EngineLoad(running=4, waiting=20))
    worker, reason = await served(pool, prompt)
    assert worker is not home and reason is Reason.SPILL


async def test_a_replica_whose_kv_cache_is_full_is_not_preferred() -> None:
    pool = pool_of(replicas(2))
    prompt = tenant(6) + question(0)
    home = pool.pick(hint=RouteHint(tokens=prompt))
    home.observe_engine(EngineLoad(kv_cache_usage=0.99))
    assert (await served(pool, prompt))[0] is not home


async def test_a_full_replica_makes_the_request_spill_not_wait() -> None:
    workers = replicas(2)
    pool = ModelPool(SPEC, workers, Capacity(per_worker=1, queue=4, queue_timeout=1), Router(RoutingConfig()))
    prompt = tenant(8) + question(0)
    first = await pool.acquire(hint=RouteHint(tokens=prompt))
    second = await pool.acquire(hint=RouteHint(tokens=prompt))
    assert second.worker is not first.worker and second.reason is Reason.SPILL
    pool.release(first)
    pool.release(second)


async def test_a_removed_replica_moves_only_its_own_prefixes() -> None:
    workers = replicas(4)
    pool = pool_of(workers)
    prompts = [tenant(seed) + question(0) for seed in range(40)]
    before = [(await served(pool, p))[0] for p in prompts]
    gone = workers[1]
    pool.workers.remove(gone)
    after = [(await served(pool, p))[0] for p in prompts]
    assert gone in before and gone not in after
    for old, new in zip(before, after, strict=True):
        if old is not gone:
            assert new is old  # everyone else's prefixes stay where their cache is
    assert len({w for old, w in zip(before, after, strict=True) if old is gone}) >= 2  # spread, not piled


async def test_a_restarted_replica_on_a_new_port_matches_nothing_it_held() -> None:
    pool = pool_of(replicas(2))
    prompt = tenant(9) + question(0)
    home, _ = await served(pool, prompt)
    home.url = home.url.replace("9000", "9001")  # embedded workers restart on a fresh port
    worker, reason = await served(pool, prompt)
    assert worker is home and reason is Reason.PREFIX_HASH  # same replica by name, cache known empty


async def test_short_prompts_and_missing_sessions_fall_back_to_least_outstanding() -> None:
    pool = pool_of(replicas(2))
    assert (await served(pool, [1, 2, 3]))[1] is Reason.LEAST_OUTSTANDING
    sessions = pool_of(replicas(2), RoutingPolicy.SESSION)
    lease = await sessions.acquire(hint=RouteHint())
    assert lease.reason is Reason.LEAST_OUTSTANDING


async def test_sessions_stick_to_one_replica_and_spread_over_all() -> None:
    first, second = pool_of(replicas(3), RoutingPolicy.SESSION), pool_of(replicas(3), RoutingPolicy.SESSION)
    homes = {}
    for session in (f"user-{i}" for i in range(30)):
        a = await first.acquire(hint=RouteHint(session=session))
        first.release(a)
        b = await second.acquire(hint=RouteHint(session=session))
        second.release(b)
        assert a.worker.name == b.worker.name and a.reason is Reason.SESSION
        homes[session] = a.worker.name
    assert len(set(homes.values())) == 3


async def test_least_outstanding_and_random_ignore_the_prompt() -> None:
    prompt = tenant(4) + question(0)
    pool = pool_of(replicas(2), RoutingPolicy.LEAST_OUTSTANDING)
    first = await pool.acquire(hint=RouteHint(tokens=prompt))
    second = await pool.acquire(hint=RouteHint(tokens=prompt))
    assert first.worker is not second.worker and {first.reason, second.reason} == {Reason.LEAST_OUTSTANDING}
    spread = pool_of(replicas(2), RoutingPolicy.RANDOM)
    names = {(await served(spread, prompt))[0].name for _ in range(40)}
    assert names == {"m-0", "m-1"}


def test_auto_is_prefix_only_with_several_replicas() -> None:
    router = Router(RoutingConfig(policy=RoutingPolicy.AUTO))
    assert router.policy_for(1) is RoutingPolicy.LEAST_OUTSTANDING
    assert router.policy_for(2) is RoutingPolicy.PREFIX


async def test_waiting_requests_keep_their_route() -> None:
    workers = replicas(2)
    pool = ModelPool(SPEC, workers, Capacity(per_worker=1, queue=4, queue_timeout=5), Router(RoutingConfig()))
    held = [await pool.acquire(), await pool.acquire()]
    prompt = tenant(12) + question(0)
    home = pool.pick(hint=RouteHint(tokens=prompt))
    waiting = asyncio.ensure_future(pool.acquire(hint=RouteHint(tokens=prompt)))
    await asyncio.sleep(0)
    for lease in sorted(held, key=lambda lease: lease.worker is home):  # the other replica frees first
        pool.release(lease)
    lease = await waiting
    assert lease.worker is not home and lease.reason is Reason.SPILL  # it took the first free slot
    pool.release(lease)


def test_the_key_covers_the_first_blocks_only() -> None:
    # Prompts sharing their first KEY_TOKENS tokens land together even when their tails differ.
    pool = pool_of(replicas(8))
    shared = tenant(13, KEY_TOKENS)
    homes = {pool.pick(hint=RouteHint(tokens=shared + tenant(100 + i, 300))).name for i in range(10)}
    assert len(homes) == 1


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("vllm-metrics.txt", EngineLoad(1.0, 2.0, 0.25, 1333.0, 640.0, 128)),
        ("vllm-metrics-old.txt", EngineLoad(0.0, 3.0, 0.5, 100.0, 40.0, 16)),
    ],
)
def test_engine_load_is_read_under_old_and_new_metric_names(fixture: str, expected: EngineLoad) -> None:
    assert parse_engine_load((FIXTURES / fixture).read_text()) == expected


def test_engine_figures_of_several_engines_add_up() -> None:
    text = "\n".join(
        [
            'vllm:num_requests_running{engine="0",model_name="m"} 2.0',
            'vllm:num_requests_running{engine="1",model_name="m"} 3.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2',
            'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7',
            "vllm:unrelated 5",
        ]
    )
    load = parse_engine_load(text)
    assert load.running == 5.0 and load.kv_cache_usage == 0.7 and load.waiting is None


def test_the_engines_count_adds_only_what_is_not_ours() -> None:
    worker = replicas(1)[0]
    worker.outstanding = 3
    worker.observe_engine(EngineLoad(running=3, waiting=0))  # all of it ours
    assert worker.load == 3
    worker.observe_engine(EngineLoad(running=4, waiting=1))  # two more from other processes
    assert worker.load == 5
    worker.outstanding = 1  # two of ours finished since that check: no stale count of them remains
    assert worker.load == 3
    worker.observe_engine(EngineLoad(running=0, waiting=0))  # answers in transit: never below our own
    assert worker.load == 1

"""Adapter affinity in routing: replicas that hold a request's adapter first (running it, then holding
it), whatever the policy; an adapter held nowhere on its rendezvous replica in every gateway process;
bounded load still rules (a hot adapter spreads); prefix hashes differ per adapter."""

from __future__ import annotations

import pytest

from service.api.app import routing_config
from service.ops.settings import ModelSpec, RoutingPolicy, Settings
from service.workers.pool import ModelPool
from service.workers.routing import Reason, RouteHint, block_hashes
from service.workers.worker import EngineLoad, Worker
from tests.unit.test_routing import BLOCK, pool_of, replicas, tenant

POLICIES = list(RoutingPolicy)


async def route(
    pool: ModelPool, adapter: str | None, tokens: list[int] | None = None
) -> tuple[Worker, Reason]:
    lease = await pool.acquire(hint=RouteHint(tokens=tokens, session="s", adapter=adapter))
    pool.release(lease)
    return lease.worker, lease.reason


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_replica_holding_the_adapter_is_preferred_whatever_the_policy(policy: RoutingPolicy) -> None:
    for holder in range(3):
        workers = replicas(3)
        workers[holder].adapters["qa"] = "/adapters/qa"
        pool = pool_of(workers, policy)
        for tokens in (tenant(seed) for seed in range(5)):
            chosen, reason = await route(pool, "qa", tokens)
            assert chosen is workers[holder]
            assert reason in {Reason.ADAPTER, Reason.PREFIX_HASH, Reason.PREFIX_MATCH, Reason.SESSION,
                              Reason.LEAST_OUTSTANDING, Reason.RANDOM}  # fmt: skip


async def test_a_replica_running_the_adapter_comes_before_one_that_only_holds_it() -> None:
    workers = replicas(3)
    workers[0].adapters["qa"] = "/adapters/qa"
    workers[2].adapters["qa"] = "/adapters/qa"
    workers[2].observe_engine(EngineLoad(running=0, waiting=0, lora_running=frozenset({"qa"})))
    pool = pool_of(workers, RoutingPolicy.LEAST_OUTSTANDING)
    assert (await route(pool, "qa"))[0] is workers[2]
    workers[2].observe_engine(EngineLoad())
    assert (await route(pool, "qa"))[0] is workers[0]


async def test_an_adapter_held_nowhere_goes_to_the_same_replica_from_every_gateway() -> None:
    # Two pools stand for two gateway processes: each sends a new adapter to its rendezvous replica, so
    # it is loaded once, not once per process.
    first, second = pool_of(replicas(4), RoutingPolicy.LEAST_OUTSTANDING), pool_of(replicas(4))
    names = [f"adapter-{i}" for i in range(12)]
    homes = []
    for name in names:
        one, reason = await route(first, name, tenant(1))
        two, _ = await route(second, name, tenant(2))
        assert one.name == two.name and reason is Reason.ADAPTER_HASH
        homes.append(one.name)
    assert len(set(homes)) >= 3  # adapters spread over the replicas


async def test_a_hot_adapter_spreads_beyond_the_load_bound() -> None:
    workers = replicas(2)
    workers[0].adapters["hot"] = "/adapters/hot"
    pool = pool_of(workers, RoutingPolicy.LEAST_OUTSTANDING, balance_factor=1.25)
    leases = [await pool.acquire(hint=RouteHint(adapter="hot")) for _ in range(8)]
    on_holder = [lease for lease in leases if lease.worker is workers[0]]
    assert leases[0].worker is workers[0] and 4 <= len(on_holder) <= 5
    assert all(lease.reason is Reason.SPILL for lease in leases if lease.worker is workers[1])
    for lease in leases:
        pool.release(lease)


async def test_a_plain_request_ignores_adapters() -> None:
    workers = replicas(2)
    workers[1].adapters["qa"] = "/adapters/qa"
    workers[1].outstanding = 3
    pool = pool_of(workers, RoutingPolicy.LEAST_OUTSTANDING)
    assert (await route(pool, None))[0] is workers[0]


def test_prefix_hashes_differ_per_adapter_and_agree_for_the_same() -> None:
    tokens = tenant(4, 64)
    plain = block_hashes(tokens, BLOCK, 8192)
    qa = block_hashes(tokens, BLOCK, 8192, adapter="qa")
    assert len(qa) == len(plain) == 4
    assert not set(qa) & set(plain)
    assert not set(qa) & set(block_hashes(tokens, BLOCK, 8192, adapter="sft"))
    assert qa == block_hashes(tokens, BLOCK, 8192, adapter="qa")
    assert not set(qa) & set(block_hashes(tokens, BLOCK, 8192, salt="k", adapter="qa"))


async def test_a_prefix_learned_with_one_adapter_is_not_matched_for_another() -> None:
    workers = replicas(3)
    for worker in workers:
        worker.adapters.update(qa="/adapters/qa", sft="/adapters/sft")
    pool = pool_of(workers)
    prompt = tenant(9)
    _, first = await route(pool, "qa", prompt)
    _, again = await route(pool, "qa", prompt)
    _, other = await route(pool, "sft", prompt)
    assert (first, again, other) == (Reason.PREFIX_HASH, Reason.PREFIX_MATCH, Reason.PREFIX_HASH)


async def test_without_affinity_an_adapter_request_goes_where_the_policy_sends_it() -> None:
    # The baseline bench/adapter_routing.py measures affinity against: least outstanding alone, the
    # adapter then loaded wherever the request lands.
    workers = replicas(3)
    workers[0].adapters["qa"] = "/adapters/qa"
    workers[0].outstanding, workers[1].outstanding = 2, 1
    pool = pool_of(workers, RoutingPolicy.LEAST_OUTSTANDING, adapter_affinity=False)
    assert await route(pool, "qa") == (workers[2], Reason.LEAST_OUTSTANDING)
    workers[2].outstanding = 3
    assert await route(pool, "new") == (workers[1], Reason.LEAST_OUTSTANDING)  # not its rendezvous replica


def test_a_models_adapter_affinity_reaches_its_router() -> None:
    spec = ModelSpec(name="m", kind="base", urls=["http://w:1"], tokenizer="t", adapter_affinity=False)
    settings = Settings(models=[spec])
    assert routing_config(settings, spec).adapter_affinity is False
    assert routing_config(settings, spec.model_copy(update={"adapter_affinity": True})).adapter_affinity

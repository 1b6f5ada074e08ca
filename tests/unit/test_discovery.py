from __future__ import annotations

from service.ops.settings import ModelKind, ModelSpec
from service.workers.discovery import discover, expand
from service.workers.pool import ModelPool

SPEC = ModelSpec(
    name="m", kind=ModelKind.BASE, tokenizer="/t", urls=["http://vllm-m:8000", "http://10.0.0.9:8000"]
)  # type: ignore[list-item]


class ChangingDns:
    """A resolver whose answer the test changes, like a headless Service scaling."""

    def __init__(self) -> None:
        self.addresses = ["10.1.0.1"]
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        assert (host, port) == ("vllm-m", 8000)
        self.calls += 1
        if not self.addresses:
            raise OSError("Name or service not known")
        return list(self.addresses)


async def test_a_name_grows_and_shrinks_the_pool() -> None:
    dns = ChangingDns()
    pool = ModelPool(SPEC)
    await discover([pool], dns)
    assert [w.url for w in pool.workers] == ["http://10.1.0.1:8000", "http://10.0.0.9:8000"]
    kept = pool.workers[0]
    kept.mark(True)
    dns.addresses = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    await discover([pool], dns)
    assert [w.url for w in pool.workers] == [
        "http://10.1.0.1:8000", "http://10.1.0.2:8000", "http://10.1.0.3:8000", "http://10.0.0.9:8000",
    ]  # fmt: skip
    assert pool.workers[0] is kept and kept.healthy  # state survives re-resolution
    dns.addresses = ["10.1.0.3"]
    await discover([pool], dns)
    assert [w.url for w in pool.workers] == ["http://10.1.0.3:8000", "http://10.0.0.9:8000"]


async def test_a_failed_lookup_keeps_the_last_known_workers() -> None:
    dns = ChangingDns()
    pool = ModelPool(SPEC)
    await discover([pool], dns)
    dns.addresses = []
    await discover([pool], dns)
    assert len(pool.workers) == 2 and dns.calls == 2


async def test_addresses_and_ipv6_are_kept_as_given() -> None:
    async def v6(host: str, port: int) -> list[str]:
        return ["fd00::1"]

    assert await expand("http://127.0.0.1:9/", v6) == ["http://127.0.0.1:9"]
    assert await expand("http://workers.local:8000/v1", v6) == ["http://[fd00::1]:8000/v1"]


async def test_the_system_resolver_expands_localhost() -> None:
    pool = ModelPool(ModelSpec(name="m", kind=ModelKind.BASE, tokenizer="/t", urls=["http://localhost:8123"]))  # type: ignore[list-item]
    await discover([pool])
    assert "http://127.0.0.1:8123" in [w.url for w in pool.workers]

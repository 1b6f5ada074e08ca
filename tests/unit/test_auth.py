"""The key guard: accepted keys named by a stable id, rates per key, and client addresses that keep
sending wrong keys refused before any key is compared."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from pydantic import ValidationError

from service.api import auth
from service.api.auth import ApiKeyMiddleware, ClientAddress, FailedKeyLimit
from service.ops.host_counters import HostCounters
from service.ops.metrics import Metrics
from service.ops.settings import Settings
from tests.helpers import call_asgi

GOOD = {"authorization": "Bearer k2"}
BAD = {"authorization": "Bearer nope"}


async def echo_key_id(scope: Any, receive: Any, send: Any) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse({"api_key_id": scope["state"].get("api_key_id")})(scope, receive, send)


def from_address(app: Any, address: str) -> Any:
    """`app` as a client at `address` reaches it."""

    async def call(scope: Any, receive: Any, send: Any) -> None:
        await app({**scope, "client": (address, 50000)}, receive, send)

    return call


def guard(attempts: int = 3, proxies: tuple[str, ...] = (), **kwargs: Any) -> ApiKeyMiddleware:
    return ApiKeyMiddleware(
        echo_key_id, keys=["k1", "k2"], failed_keys=FailedKeyLimit(attempts, 60, proxies), **kwargs
    )


async def test_an_accepted_key_is_named_by_its_short_stable_id() -> None:
    answer = await call_asgi(guard(), "POST", "/x", b"", GOOD)
    assert answer.json() == {"api_key_id": hashlib.sha256(b"k2").hexdigest()[:32]}


async def test_an_address_that_keeps_failing_is_refused_without_a_key_check_and_others_are_not() -> None:
    metrics = Metrics(lambda: [])
    middleware = guard(attempts=3, metrics=metrics)
    attacker, neighbour = from_address(middleware, "10.0.0.1"), from_address(middleware, "10.0.0.2")
    assert [(await call_asgi(attacker, "POST", "/x", b"", BAD)).status for _ in range(3)] == [401] * 3
    refused = await call_asgi(attacker, "POST", "/x", b"", GOOD)  # even a good key: not compared
    assert refused.status == 429 and refused.json()["error"]["code"] == "too_many_failed_attempts"
    assert 59 <= int(refused.headers["retry-after"]) <= 62
    assert (await call_asgi(neighbour, "POST", "/x", b"", GOOD)).status == 200
    assert (await call_asgi(neighbour, "POST", "/x", b"", BAD)).status == 401
    assert metrics.registry.get_sample_value("gateway_auth_failures_total") == 4
    assert metrics.registry.get_sample_value("gateway_auth_throttled_total") == 1


async def test_no_limit_on_failed_keys_when_set_to_zero() -> None:
    attacker = from_address(guard(attempts=0), "10.0.0.1")
    assert {(await call_asgi(attacker, "POST", "/x", b"", BAD)).status for _ in range(20)} == {401}


async def test_the_rate_limit_counts_each_key_in_the_shared_counters() -> None:
    counters = HostCounters.in_memory()
    first = guard(rate_limit="2/minute", counters=counters)
    second = guard(rate_limit="2/minute", counters=counters)  # another process on the same counters
    statuses = [(await call_asgi(app, "POST", "/x", b"", GOOD)).status for app in (first, second, first)]
    assert statuses == [200, 200, 429]
    assert (await call_asgi(second, "POST", "/x", b"", {"authorization": "Bearer k1"})).status == 200


@pytest.mark.parametrize(
    ("peer", "forwarded", "proxies", "client"),
    [
        ("10.0.0.9", "", (), "10.0.0.9"),
        ("10.0.0.9", "1.2.3.4", (), "10.0.0.9"),  # an untrusted peer's header is ignored
        ("10.0.0.9", "1.2.3.4", ("10.0.0.0/8",), "1.2.3.4"),
        ("10.0.0.9", "6.6.6.6, 1.2.3.4, 10.0.0.7", ("10.0.0.0/8",), "1.2.3.4"),  # spoofed left part
        ("2001:db8::1", "", (), "2001:db8::/64"),  # an IPv6 client stands for its /64
        ("::ffff:1.2.3.4", "", (), "1.2.3.4"),
        # A dual-stack listener (GATEWAY_HOST=::) sees an IPv4 proxy as IPv4-mapped: still trusted.
        ("::ffff:127.0.0.1", "10.9.9.9", ("127.0.0.1",), "10.9.9.9"),
        # How proxies write a client: with a port, in brackets, zero-padded; one client each time.
        ("127.0.0.1", "10.20.30.40:1234", ("127.0.0.1",), "10.20.30.40"),
        ("127.0.0.1", "[::ffff:10.20.30.40]", ("127.0.0.1",), "10.20.30.40"),
        ("127.0.0.1", "[2001:db8::1]:443", ("127.0.0.1",), "2001:db8::/64"),
        ("127.0.0.1", "010.020.030.040", ("127.0.0.1",), "10.20.30.40"),
    ],
)
def test_the_client_address_trusts_only_the_configured_proxies(
    peer: str, forwarded: str, proxies: tuple[str, ...], client: str
) -> None:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    assert ClientAddress(proxies).of({"client": (peer, 1), "headers": headers}) == client


def test_trusted_proxies_are_read_comma_separated_and_checked() -> None:
    settings = Settings(trusted_proxies="10.0.0.0/8, 127.0.0.1")  # type: ignore[arg-type]
    assert settings.trusted_proxies == ["10.0.0.0/8", "127.0.0.1"]
    with pytest.raises(ValidationError, match="not an address or CIDR network"):
        Settings(trusted_proxies="10.0.0.0/8, proxy.internal")  # type: ignore[arg-type]


def test_the_client_address_is_grouped_once_per_address_and_the_memo_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Parsing an address costs more than the rest of a key check: it is done once per address, and
    the addresses remembered never pass GROUPED_MEMO however many clients come."""
    monkeypatch.setattr(auth, "GROUPED_MEMO", 8)
    parsed: list[str] = []
    real_group = auth.group

    def counted(address: str) -> str:
        parsed.append(address)
        return real_group(address)

    monkeypatch.setattr(auth, "group", counted)
    addresses = ClientAddress(())
    for _ in range(3):
        assert addresses.of({"client": ("2001:db8::1", 1), "headers": []}) == "2001:db8::/64"
    assert parsed == ["2001:db8::1"]
    for n in range(100):
        assert addresses.of({"client": (f"10.0.0.{n}", 1), "headers": []}) == f"10.0.0.{n}"
    assert len(addresses._grouped) <= 8


def test_the_last_authorization_header_is_the_one_checked() -> None:
    """As a dict of the headers would keep it: the last of repeated Authorization headers counts."""
    middleware = ApiKeyMiddleware(lambda *_: None, ["k"])  # type: ignore[arg-type]
    last_right = [(b"authorization", b"Bearer first"), (b"host", b"x"), (b"authorization", b"Bearer k")]
    last_wrong = [(b"authorization", b"Bearer k"), (b"authorization", b"Bearer x")]
    assert middleware._accepted({"headers": last_right})[0] is not None
    assert middleware._accepted({"headers": last_wrong}) == (None, None)

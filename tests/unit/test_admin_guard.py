"""The operator's routes take admin keys only, and are off without them; client routes are not theirs."""

from __future__ import annotations

from typing import Any

from service.api.admin_auth import AdminGuard
from service.api.auth import FailedKeyLimit
from service.api.endpoint import Endpoint, PathSet, admin_paths
from tests.helpers import call_asgi

OPERATOR = PathSet(["/adapters", "/adapters/{name}"])


async def served(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", "content-type": "application/json"}


async def test_without_admin_keys_the_operator_api_is_off() -> None:
    guard = AdminGuard(served, keys=[], paths=OPERATOR)
    call = await call_asgi(guard, "GET", "/adapters", headers=bearer("anything"))
    assert call.status == 403 and call.json()["error"]["code"] == "admin_api_off"
    assert (await call_asgi(guard, "GET", "/v1/models")).status == 200  # not an operator route


async def test_only_an_admin_key_passes_on_every_operator_path() -> None:
    guard = AdminGuard(served, keys=["admin-1"], paths=OPERATOR)
    for path in ("/adapters", "/adapters/my-sft"):
        assert (await call_asgi(guard, "DELETE", path, headers=bearer("admin-1"))).status == 200
        refused = await call_asgi(guard, "DELETE", path, headers=bearer("client-key"))
        assert refused.status == 401 and "GATEWAY_ADMIN_KEYS" in refused.json()["error"]["message"]
        assert (await call_asgi(guard, "DELETE", path, headers={})).status == 401
    assert (await call_asgi(guard, "GET", "/adapterss", headers={})).status == 200  # not theirs


async def test_wrong_admin_keys_from_one_address_are_throttled() -> None:
    guard = AdminGuard(served, keys=["admin-1"], paths=OPERATOR, failed_keys=FailedKeyLimit(2, 60.0))
    state: dict[str, Any] = {}
    statuses = [(await call_asgi(guard, "GET", "/adapters", headers=bearer("guess"), state=state)).status
                for _ in range(3)]  # fmt: skip
    assert statuses == [401, 401, 429]
    assert (await call_asgi(guard, "GET", "/adapters", headers=bearer("admin-1"))).status == 429


def test_operator_paths_come_from_the_endpoint_table() -> None:
    table = [Endpoint("/adapters", "", "admin", method="GET", admin=True),
             Endpoint("/adapters/{name}", "", "admin", method="DELETE", admin=True),
             Endpoint("/v1/models", "", "openai", method="GET")]  # fmt: skip
    paths = admin_paths(table)
    assert "/adapters" in paths and "/adapters/a.b-c" in paths
    assert "/v1/models" not in paths and "/adapters/a/b" not in paths

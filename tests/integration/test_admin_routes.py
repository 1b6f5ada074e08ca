"""An operator route from the endpoint table, in the real app: admin keys only, client keys only on client
routes, DELETE routes registered, and the store migrated at start."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from service.api.endpoint import Endpoint
from service.api.endpoints import ENDPOINTS
from tests.integration.conftest import running_gateway, standin_settings


async def things() -> dict[str, Any]:
    return {"things": []}


async def forget(name: str) -> dict[str, Any]:
    return {"deleted": name}


TABLE = (
    *ENDPOINTS,
    Endpoint("/things", "The operator's things.", "admin", method="GET", handler=things, admin=True),
    Endpoint("/things/{name}", "Forget a thing.", "admin", method="DELETE", handler=forget, admin=True),
)


async def test_operator_routes_take_admin_keys_and_client_routes_client_keys(
    standin_url: str, tmp_path: Path
) -> None:
    settings = standin_settings(
        standin_url,
        api_keys="client-1",
        admin_keys="admin-1",
        database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
    )
    async with running_gateway(settings, TABLE) as (_, http):
        admin = {"Authorization": "Bearer admin-1"}
        client = {"Authorization": "Bearer client-1"}
        assert (await http.get("/things", headers=admin)).json() == {"things": []}
        assert (await http.delete("/things/a", headers=admin)).json() == {"deleted": "a"}
        assert (await http.get("/things", headers=client)).status_code == 401
        assert (await http.get("/v1/models", headers=client)).status_code == 200
        assert (await http.get("/v1/models", headers=admin)).status_code == 401  # not a client key
    with sqlite3.connect(tmp_path / "gateway.db") as db:  # migrated at start
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"alembic_version", "adapters", "revisions"} <= tables


async def test_an_admin_key_on_a_client_route_is_refused_without_counting_as_a_guess(
    standin_url: str, tmp_path: Path
) -> None:
    """Ten client requests with the admin key locked the operator's own address out of the operator routes
    for a minute (review of issue 20, s27): the admin key is no guess."""
    settings = standin_settings(
        standin_url, api_keys="client-1", admin_keys="admin-1", auth_failure_limit=3,
        database_url=f"sqlite:///{tmp_path / 'gateway.db'}",
    )  # fmt: skip
    async with running_gateway(settings, TABLE) as (_, http):
        admin = {"Authorization": "Bearer admin-1"}
        for _ in range(5):
            refused = await http.get("/v1/models", headers=admin)
            assert refused.status_code == 401 and "This is an admin key" in refused.text
        assert (await http.get("/things", headers=admin)).status_code == 200
        for _ in range(3):  # a wrong key still counts
            assert (await http.get("/v1/models", headers={"Authorization": "Bearer nope"})).status_code == 401
        assert (await http.get("/v1/models", headers={"Authorization": "Bearer nope"})).status_code == 429

"""The operator's routes for API keys and usage (admin keys only, see `service.api.admin_auth`):
POST /keys (a new key: its secret is in this answer and nowhere else), GET /keys, DELETE /keys/{key}
(revoke), GET /usage (per key, served model and day)."""

from __future__ import annotations

import contextlib
import re
import time
from datetime import UTC, date, timedelta
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from service.core.context import RequestContext
from service.core.gateway import Gateway
from service.core.key_policy import NewKey
from service.core.keys import StoredKey
from service.core.tenants import Tenants
from service.core.usage import today
from service.errors import InvalidRequest, KeyNotFound

DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
MONTH = re.compile(r"^\d{4}-\d{2}$")
PERIODS = "`day` (today, UTC), `month` (this month), `all`, a day (`2026-12-05`) or a month (`2026-12`)"


async def get_tenants(request: Request) -> Tenants:
    """The runtime keys of this process (built with the app)."""
    tenants: Tenants = request.app.state.tenants
    return tenants


TenantsDep = Annotated[Tenants, Depends(get_tenants)]


async def create(gateway: Gateway, request: NewKey, ctx: RequestContext) -> Response:
    """POST /keys: a new key with its policy; the answer holds its secret, shown this once."""
    served = gateway.models
    unknown = [name for name in request.models or [] if name not in served]
    if unknown and gateway.registry is not None:  # an adapter another process registered this second
        with contextlib.suppress(Exception):  # the store away: the key cannot be created anyway
            await gateway.registry.refresh()
        unknown = [name for name in unknown if name not in served]
    if unknown:
        raise InvalidRequest(
            f"No served model is named {', '.join(repr(n) for n in unknown)}; served models: "
            f"{', '.join(served)}.",
            param="models",
        )
    if request.models is not None and request.kinds is not None:
        excluded = [n for n in request.models if served[n].kind not in request.kinds]
        if excluded:
            raise InvalidRequest(
                f"{', '.join(repr(n) for n in excluded)} is of a kind the key may not use "
                f"({', '.join(k.value for k in request.kinds)} only): the key could never use it.",
                param="models",
            )
    assert gateway.tenants is not None
    secret, record = await gateway.tenants.create(request.name, request.policy())
    return JSONResponse({"id": record.id, "key": secret, **record.describe()}, status_code=201)


async def list_keys(
    tenants: TenantsDep,
    revoked: Annotated[bool, Query(description="Include revoked keys.")] = False,
) -> dict[str, Any]:
    """GET /keys: every key (never a secret), with its budget's numbers right now."""
    await tenants.exchange_soon(full=True)  # this process's latest spending first
    keys = [key for key in await tenants.stored_keys() if revoked or not key.revoked]
    statuses = await tenants.budget_statuses([key for key in keys if not key.revoked])
    return {"object": "list", "data": [_described(key, statuses.get(key.id)) for key in keys]}


async def revoke(key: str, tenants: TenantsDep) -> dict[str, Any]:
    """DELETE /keys/{key}: revoke a key (by id, or by a name only one live key has)."""
    found = await _find(tenants, key)
    record = await tenants.revoke(found.id)
    if record is None:
        raise KeyNotFound(key)
    return record.describe()


async def usage(
    tenants: TenantsDep,
    key: Annotated[str | None, Query(description="A key's id, or a name only one key has.")] = None,
    model: Annotated[str | None, Query(description="A served model's name.")] = None,
    period: Annotated[str, Query(description=f"One of {PERIODS}.")] = "month",
) -> dict[str, Any]:
    """GET /usage: requests (errors apart) and tokens per key, served model and day."""
    first, last = period_days(period, time.time())
    key_id = (await _find(tenants, key, revoked_too=True)).id if key is not None else None
    await tenants.exchange_soon(full=True)  # this process's latest counts first
    rows = await tenants.usage_rows(first, last, key_id, model)
    totals = {
        name: sum(row[name] for row in rows) for name in ("requests", "errors", "tokens_in", "tokens_out")
    }
    return {
        "object": "list",
        "period": {"first": first.isoformat() if first else None, "last": last.isoformat() if last else None},
        "data": [{**row, "day": row["day"].isoformat()} for row in rows],
        "totals": totals,
    }


def period_days(period: str, now: float) -> tuple[date | None, date | None]:
    """The first and last day (UTC) a period covers; (None, None): all of them."""
    current = today(now)
    if period == "day":
        return current, current
    if period == "month":
        period = current.strftime("%Y-%m")
    if period == "all":
        return None, None
    try:
        if DAY.match(period):
            day = date.fromisoformat(period)
            return day, day
        if MONTH.match(period):
            first = date.fromisoformat(f"{period}-01")
            following = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
            return first, following - timedelta(days=1)
    except ValueError:
        pass
    raise InvalidRequest(f"period: expected {PERIODS}; got {period[:40]!r}.", param="period")


async def _find(tenants: TenantsDep, key: str, revoked_too: bool = False) -> StoredKey:
    """A stored key by id, else by a name exactly one (live) key has."""
    keys = await tenants.stored_keys()
    for found in keys:
        if found.id == key:
            return found
    named = [found for found in keys if found.name == key and (revoked_too or not found.revoked)]
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise InvalidRequest(
            f"{len(named)} keys are named '{key[:100]}'; give the id of the one you mean (GET /keys).",
            param="key",
        )
    raise KeyNotFound(key)


def _described(key: StoredKey, status: tuple[int, int] | None) -> dict[str, Any]:
    """A key as GET /keys shows it: with its budget's (used, reserved) numbers, when it has a budget."""
    entry = key.describe()
    budget = key.policy.token_budget
    if budget is not None and status is not None:
        used, reserved = status
        resets = budget.resets_at(time.time())
        entry["token_budget"] = {
            **budget.model_dump(mode="json"),
            "used": used,
            "reserved": reserved,
            "left": max(0, budget.tokens - used - reserved),
            "resets_at": resets.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if resets else None,
        }
    return entry

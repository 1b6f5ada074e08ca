"""Dependency aliases so route signatures read like prose."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.core.gateway import Gateway
from service.core.tenancy import Caller
from service.ops.record import RequestRecord


# Dependencies are `async def` on purpose: FastAPI runs plain `def` ones in a threadpool.
async def get_gateway(request: Request) -> Gateway:
    """The gateway built by the app's lifespan."""
    gateway: Gateway = request.app.state.gateway
    return gateway


async def get_record(request: Request) -> RequestRecord:
    """This generation request's record, opened by the observability middleware."""
    record: RequestRecord = request.state.record
    return record


async def get_caller(request: Request) -> Caller:
    """Who sent the request (its API key's caller; the open caller without keys)."""
    caller: Caller = request.app.state.tenancy.caller(getattr(request.state, "api_key_id", None))
    return caller


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
CallerDep = Annotated[Caller, Depends(get_caller)]
RecordDep = Annotated[RequestRecord, Depends(get_record)]

"""Dependency aliases so route signatures read like prose."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.core.gateway import Gateway
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


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
RecordDep = Annotated[RequestRecord, Depends(get_record)]

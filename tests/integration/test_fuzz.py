"""Schema-driven fuzzing (schemathesis) of the gateway's own OpenAPI schema: whatever the input,
no 5xx, and every answer conforms to the documented status codes, content types and schemas.
A stand-in answers as the worker, so the fuzzing exercises the gateway, not the model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.app import create_app
from service.api.endpoints import ENDPOINTS
from tests.integration.conftest import serve_in_thread, standin_settings
from tests.integration.standin import Script, build_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Every documented endpoint of the table (the metrics text and the playground's page and icon are not
# JSON APIs).
OPERATIONS = [
    (endpoint.method, endpoint.path.replace(":path", ""))
    for endpoint in ENDPOINTS
    if endpoint.path != "/metrics" and endpoint.tag != "playground"
]


@pytest.fixture(scope="module")
def gateway_schema() -> Iterator[schemathesis.schemas.BaseSchema]:
    with serve_in_thread(build_app(Script())) as worker_url:
        gateway = create_app(standin_settings(worker_url, max_body_bytes=256 * 1024))
        with serve_in_thread(gateway) as url:
            yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_every_route_is_fuzzed(gateway_schema: schemathesis.schemas.BaseSchema) -> None:
    documented = {
        (method.upper(), path) for path, ops in gateway_schema.raw_schema["paths"].items() for method in ops
    }
    assert documented - {("GET", "/metrics")} == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_input_breaks_the_gateway(
    gateway_schema: schemathesis.schemas.BaseSchema, method: str, path: str
) -> None:
    operation = gateway_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=30)

    call()

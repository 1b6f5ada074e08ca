"""Tracing is configured by the standard OTEL_* variables and costs nothing when off."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service.ops.tracing import endpoint_from_env


@pytest.mark.parametrize(
    ("env", "endpoint"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/x"}, "http://t:9/x"),  # used as given
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "http://c:4317",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}, None),  # compose passes an empty value when unset
    ],
)
def test_the_endpoint_follows_the_standard_variables(env: dict[str, str], endpoint: str | None) -> None:
    assert endpoint_from_env(env) == endpoint


def test_with_tracing_off_nothing_of_the_sdk_is_loaded() -> None:
    # A fresh interpreter: building the app with tracing off imports no OpenTelemetry SDK module (so no
    # exporter thread can exist and no span can be made).
    code = (
        "import sys\n"
        "from service.api.app import create_app\n"
        "from service.ops.settings import ModelSpec, Settings\n"
        "spec = ModelSpec(name='m', kind='base', tokenizer='/t', urls=['http://w:1'])\n"
        "app = create_app(Settings(models=[spec]))\n"
        "assert app.state.tracing is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"

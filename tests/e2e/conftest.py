"""The real embedded stack, started once per session: `llm-gateway serve` launching vLLM CPU
workers with the two packaged models (prepared by `make test` before pytest runs)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.otlp_sink import Receiver, Sink
from service.ops.settings import RoutingPolicy, Settings, default_models
from tests.doc_examples import ADMIN_KEY
from tests.gateway_process import READY_TIMEOUT_SECONDS, Stack, answers, launch, stop, wait_ready

# The stack's operator key: the operator API's examples (docs/user-guide/adapters.md) and /metrics (the
# operator's whenever admin keys are set).
STACK_ADMIN_KEY = "admin-secret"
OPERATOR = {"Authorization": f"Bearer {STACK_ADMIN_KEY}"}

BASE_MODEL = "gemma-3-270m"
INSTRUCT_MODEL = "smollm2-135m-instruct"
SMOL = "smol-supervised"  # the second gateway's only model: SmolLM2 with an overriding chat template
PAIR = "smol-pair"  # the third gateway's model: two SmolLM2 replicas, prefix routing
SMOL_LOG_CAP = 6_000  # its worker log's rotation size (vLLM's start-up output alone is ~16 KB)
# ChatML without SmolLM2's default system prompt, and with a visible marker.
OVERRIDE_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n[override] ' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The gateway with both default models on embedded workers, ready to serve."""
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    stack = launch(
        {
            "GATEWAY_HEALTH_INTERVAL": "1",
            "GATEWAY_RESTART_BACKOFF_INITIAL": "1",
            "GATEWAY_DRAIN_ACCEPT_WINDOW": "2",
            "GATEWAY_ADMIN_KEYS": STACK_ADMIN_KEY,
        },
        log_path,
    )
    started = time.monotonic()
    try:
        wait_ready(stack)
        print(f"\nembedded stack ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield stack
    finally:
        stop(stack)


@pytest.fixture(scope="session")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second gateway: SmolLM2 only, with a chat template that overrides the model's own (the
    worker is pinned to it), restarted quickly when wedged, its log rotated at a small size."""
    folder = tmp_path_factory.mktemp("smol")
    template = folder / "override.jinja"
    template.write_text(OVERRIDE_TEMPLATE)
    spec = default_models()[1].model_copy(update={"name": SMOL, "chat_template": template})
    env = {
        "GATEWAY_MODELS": json.dumps([spec.model_dump(mode="json")]),
        "GATEWAY_HEALTH_INTERVAL": "1",
        "GATEWAY_HEALTH_TIMEOUT": "1",
        "GATEWAY_WORKER_RESTART_AFTER_FAILED_CHECKS": "3",
        "GATEWAY_RESTART_BACKOFF_INITIAL": "1",
        "GATEWAY_WORKER_LOG_MAX_BYTES": str(SMOL_LOG_CAP),
        "GATEWAY_WORKER_CPU_BINDING": "false",
    }
    stack = launch(env, folder / "gateway.log")
    try:
        wait_ready(stack)
        yield stack
    finally:
        stop(stack)


@pytest.fixture(scope="session")
def otlp() -> Iterator[Sink]:
    """An OTLP/HTTP receiver the third gateway and its workers export their spans to."""
    with Receiver() as sink:
        yield sink


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory, otlp: Sink) -> Iterator[Stack]:
    """A third gateway: two SmolLM2 replicas with prefix routing, served by two gateway processes
    (one supervising the workers), tracing to `otlp` (and so are its workers)."""
    spec = default_models()[1].model_copy(
        update={"name": PAIR, "replicas": 2, "routing": RoutingPolicy.PREFIX}
    )
    env = {
        "GATEWAY_MODELS": json.dumps([spec.model_dump(mode="json")]),
        "GATEWAY_PROCESSES": "2",
        "GATEWAY_HEALTH_INTERVAL": "0.5",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    stack = launch(env, tmp_path_factory.mktemp("pair") / "gateway.log")
    try:
        wait_ready(stack)  # one replica up; wait for the other too
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not all(answers(f"{url}/health") for url in stack.worker_urls()):
            assert time.monotonic() < deadline, stack.log()[-4000:]
            time.sleep(1)
        time.sleep(1.5)  # three health rounds: every gateway process has seen both replicas up
        yield stack
    finally:
        stop(stack)


@pytest.fixture(scope="session")
def admin_stack(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway in front of `stack`'s workers with the operator API on (the docs' admin key) and a
    database of its own: the keys the docs' examples create never reach the other gateways."""
    folder = tmp_path_factory.mktemp("admin")
    settings = Settings()
    models = [
        {"name": spec.name, "kind": spec.kind.value, "urls": [stack.worker_url(spec.name)],
         "tokenizer": settings.resolve_source(spec.source or spec.name)}
        for spec in default_models()
    ]  # fmt: skip
    env = {"GATEWAY_MODELS": json.dumps(models), "GATEWAY_ADMIN_KEYS": ADMIN_KEY}
    admin = launch(env, folder / "gateway.log")  # its store: gateway.db beside the log
    try:
        wait_ready(admin)
        yield admin
    finally:
        stop(admin)


@pytest.fixture(scope="session")
def client(stack: Stack) -> Iterator[httpx.Client]:
    """HTTP client bound to the running gateway."""
    with httpx.Client(base_url=stack.url, timeout=300) as http:
        yield http


@pytest.fixture(scope="session")
def model_dirs() -> dict[str, Path]:
    """Prepared folders of the built-in models (what the workers load)."""
    settings = Settings()
    return {name: settings.model_dir(name) for name in (BASE_MODEL, INSTRUCT_MODEL)}

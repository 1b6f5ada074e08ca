"""The workers' guard (service/workers/worker_guard.py): every route of a worker but /health needs the
workers' key, whatever vLLM's own --api-key covers; embedded workers are launched with it when a
workers' key is configured; the guard loads in a worker's Python without the gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.ops.settings import ModelKind, ModelSpec, Settings
from service.workers.supervisor import launch_plan
from service.workers.worker_guard import MIDDLEWARE, WorkerGuard
from tests.helpers import call_asgi

KEY = "the-workers-key"
SPEC = ModelSpec(name="m", kind=ModelKind.BASE, source="builtin:m")
EXTERNAL = ModelSpec(name="x", kind=ModelKind.BASE, tokenizer="t", urls=["http://w:8000"])  # type: ignore[list-item]
# What vLLM 0.32 serves that its --api-key leaves open, and what it guards.
PATHS = ["/invocations", "/tokenize", "/detokenize", "/metrics", "/version", "/load", "/ping",
         "/scale_elastic_ep", "/openapi.json", "/docs", "/v1/completions", "/v1/models", "/health/",
         "//health", "/HEALTH", "/health/../invocations"]  # fmt: skip


class Worker:
    """The app behind the guard: records what reached it."""

    def __init__(self) -> None:
        self.reached: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"served"})


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "OPTIONS"])
async def test_every_route_but_health_needs_the_key(path: str, method: str) -> None:
    worker = Worker()
    guard = WorkerGuard(worker, KEY)
    for headers in ({}, bearer("wrong"), bearer(KEY[:-1]), bearer(KEY + "x"),
                    {"authorization": f"Basic {KEY}"}, {"authorization": KEY}, bearer("")):  # fmt: skip
        refused = await call_asgi(guard, method, path, headers=headers)
        assert refused.status == 401, (path, headers)
        assert refused.json()["error"]["code"] == "worker_key_required"
        assert refused.headers["www-authenticate"] == "Bearer"
    assert worker.reached == []
    passed = await call_asgi(guard, method, path, headers=bearer(KEY))
    assert (passed.status, passed.body) == (200, b"served")
    passed = await call_asgi(guard, method, path, headers={"authorization": f"bearer  {KEY} "})
    assert passed.status == 200


async def test_health_is_open_for_probes_that_carry_no_key() -> None:
    worker = Worker()
    guard = WorkerGuard(worker, KEY)
    assert (await call_asgi(guard, "GET", "/health", headers={})).status == 200
    assert (await call_asgi(guard, "GET", "/health", headers=bearer("wrong"))).status == 200
    assert worker.reached == ["/health", "/health"]


async def test_a_root_path_is_taken_off_before_the_check() -> None:
    guard = WorkerGuard(Worker(), KEY)
    scope = {"type": "http", "method": "GET", "path": "/api/health", "root_path": "/api", "headers": []}
    assert guard.allows(scope)
    assert not guard.allows({**scope, "path": "/api/invocations"})


async def test_a_websocket_without_the_key_is_closed_before_it_opens() -> None:
    sent: list[dict[str, Any]] = []
    reached: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    guard = WorkerGuard(app, KEY)
    await guard({"type": "websocket", "path": "/v1/realtime", "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}] and reached == []
    keyed = [(b"authorization", f"Bearer {KEY}".encode())]
    await guard({"type": "websocket", "path": "/v1/realtime", "headers": keyed}, receive, send)
    assert reached == ["/v1/realtime"]


async def test_lifespan_passes_and_without_a_key_everything_does(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = Worker()
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    open_guard = WorkerGuard(worker)
    assert (await call_asgi(open_guard, "POST", "/invocations", headers={})).status == 200
    monkeypatch.setenv("VLLM_API_KEY", KEY)  # how a worker gives it the key: vLLM builds it without arguments
    keyed = WorkerGuard(worker)
    assert (await call_asgi(keyed, "POST", "/invocations", headers={})).status == 401
    assert (await call_asgi(keyed, "POST", "/invocations", headers=bearer(KEY))).status == 200


def test_embedded_workers_load_the_guard_from_a_private_folder(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, worker_api_key=KEY)  # type: ignore[arg-type]
    plan = launch_plan(SPEC, settings, port=9001, cores=None, replica=0)
    middleware = plan.argv[plan.argv.index("--middleware") + 1]
    assert middleware == MIDDLEWARE == "llm_gateway_worker_guard.WorkerGuard"
    folder = Path(plan.env["PYTHONPATH"].split(":")[0])
    assert [p.name for p in folder.iterdir()] == ["llm_gateway_worker_guard.py"]  # nothing else to shadow
    assert folder.stat().st_mode & 0o777 == 0o700
    source = Path(sys.modules[WorkerGuard.__module__].__file__ or "").read_bytes()
    assert (folder / "llm_gateway_worker_guard.py").read_bytes() == source
    assert plan.env["VLLM_API_KEY"] == KEY and not any(KEY in arg for arg in plan.argv)
    unkeyed = launch_plan(SPEC, Settings(cache_dir=tmp_path), 9001, None, 0)
    assert "--middleware" not in unkeyed.argv


def test_engine_env_cannot_drop_the_guard_from_the_import_path(tmp_path: Path) -> None:
    spec = SPEC.model_copy(update={"engine_env": {"PYTHONPATH": "/opt/extra"}})
    plan = launch_plan(spec, Settings(cache_dir=tmp_path, worker_api_key=KEY), 9001, None, 0)  # type: ignore[arg-type]
    assert plan.env["PYTHONPATH"] == f"{tmp_path / 'worker-guard'}:/opt/extra"


def test_the_guard_loads_in_a_bare_python_importing_only_the_standard_library(tmp_path: Path) -> None:
    plan = launch_plan(SPEC, Settings(cache_dir=tmp_path, worker_api_key=KEY), 9001, None, 0)  # type: ignore[arg-type]
    code = (
        "import sys, json, llm_gateway_worker_guard as g; g.WorkerGuard(None);"
        "print(json.dumps(sorted(m for m in sys.modules"
        " if m.split('.')[0] not in sys.stdlib_module_names and m != '__main__')))"
    )
    env = {"PYTHONPATH": plan.env["PYTHONPATH"], "VLLM_API_KEY": KEY}
    argv = [sys.executable, "-S", "-c", code]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["llm_gateway_worker_guard"]

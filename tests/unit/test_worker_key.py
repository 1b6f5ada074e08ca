"""The workers' own key: embedded workers are launched requiring it, and every request the gateway
makes to a worker carries it."""

from __future__ import annotations

from pathlib import Path

from service.ops.settings import ModelKind, ModelSpec, Settings
from service.workers.http_transport import build_session, worker_headers
from service.workers.supervisor import launch_plan

SPEC = ModelSpec(name="m", kind=ModelKind.BASE, source="builtin:m")


def test_embedded_workers_require_the_key_without_showing_it(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, worker_api_key="worker-secret")  # type: ignore[arg-type]
    plan = launch_plan(SPEC, settings, port=9001, cores=None, replica=0)
    assert plan.env["VLLM_API_KEY"] == "worker-secret"  # vLLM's --api-key, read from its environment
    assert not any("worker-secret" in arg for arg in plan.argv)  # /proc/<pid>/cmdline is world-readable
    assert "VLLM_API_KEY" not in launch_plan(SPEC, Settings(cache_dir=tmp_path), 9001, None, 0).env


async def test_every_request_to_a_worker_carries_the_key() -> None:
    settings = Settings(worker_api_key="worker-secret")  # type: ignore[arg-type]
    assert worker_headers(settings)["Authorization"] == "Bearer worker-secret"
    assert "Authorization" not in worker_headers(Settings())
    session = build_session(settings)  # the one session for requests, and the one for probes
    try:
        assert session.headers["Authorization"] == "Bearer worker-secret"
    finally:
        await session.close()

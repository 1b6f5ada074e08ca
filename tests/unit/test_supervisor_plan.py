from __future__ import annotations

from pathlib import Path

import pytest

from service.ops.settings import ModelKind, ModelSpec, Settings
from service.workers.supervisor import launch_plan, plan_core_binding


def test_one_worker_is_left_to_vllm() -> None:
    assert plan_core_binding(1, [0, 1]) == [None]


def test_two_workers_on_two_cores_get_one_each() -> None:
    assert plan_core_binding(2, [0, 1]) == ["0", "1"]


def test_cores_split_as_evenly_as_possible() -> None:
    assert plan_core_binding(3, [0, 1, 2, 3, 4, 5, 6]) == ["0,1,2", "3,4", "5,6"]


def test_more_workers_than_cores_share_round_robin() -> None:
    assert plan_core_binding(3, [0, 1]) == ["0", "1", "0"]


def test_launch_plan_runs_vllm_openai_server(tmp_path: Path) -> None:
    spec = ModelSpec(
        name="m", kind=ModelKind.BASE, source="builtin:m", max_model_len=1024,
        engine_args=["--max-num-seqs", "4"], engine_env={"EXTRA": "1"},
    )  # fmt: skip
    settings = Settings(cache_dir=tmp_path, engine_python="/py", worker_kv_cache_gib=2)
    plan = launch_plan(spec, settings, port=9001, cores="1", replica=0)
    assert plan.argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    argv = " ".join(plan.argv)
    assert f"--model {tmp_path}/models/m --served-model-name m" in argv
    assert "--port 9001" in argv and "--max-model-len 1024" in argv and "--enforce-eager" in argv
    assert argv.endswith("--max-num-seqs 4")
    assert plan.env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert plan.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert plan.env["EXTRA"] == "1"
    assert plan.log_path == tmp_path / "logs" / "m-0.log"


def test_workers_do_not_share_the_gateways_metrics_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Several gateway processes merge metrics through this folder; a vLLM worker inheriting it would
    # write its own metrics there too, and every worker's /metrics would show the sum of all of them.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    spec = ModelSpec(name="m", kind=ModelKind.BASE, source=str(tmp_path))
    plan = launch_plan(spec, Settings(cache_dir=tmp_path), port=9001, cores=None, replica=0)
    assert "PROMETHEUS_MULTIPROC_DIR" not in plan.env


def test_a_model_with_adapters_runs_workers_with_lora_and_runtime_loading(tmp_path: Path) -> None:
    from tests.adapters import adapter_folder

    qa = adapter_folder(tmp_path, "qa", rank=20)
    spec = ModelSpec(name="m", kind=ModelKind.BASE, source="/m", adapters=[{"name": "qa", "path": str(qa)}])
    plan = launch_plan(spec, Settings(cache_dir=tmp_path), port=9001, cores=None, replica=0)
    argv = " ".join(plan.argv)
    assert "--enable-lora --max-loras 1 --max-cpu-loras 1 --max-lora-rank 32" in argv
    assert "--trust-request-chat-template" in argv  # an adapter's own template comes with its requests
    assert plan.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    runtime = ModelSpec(name="m", kind=ModelKind.BASE, source="/m", lora=True, max_loras=3, max_cpu_loras=8,
                        trust_request_chat_template=True)  # fmt: skip
    argv = launch_plan(runtime, Settings(cache_dir=tmp_path), port=9001, cores=None, replica=0).argv
    assert " ".join(argv).count("--trust-request-chat-template") == 1
    assert "--max-loras 3 --max-cpu-loras 8 --max-lora-rank 16" in " ".join(argv)
    plain = launch_plan(ModelSpec(name="m", kind=ModelKind.BASE, source="/m"), Settings(cache_dir=tmp_path),
                        port=9001, cores=None, replica=0)  # fmt: skip
    assert "--enable-lora" not in plain.argv and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in plain.env

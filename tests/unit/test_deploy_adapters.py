"""Adapters in the deployment files: every pod that serves or checks adapters mounts the same volume at the
same path, the workers run with LoRA and runtime loading on, and the gateway's models file says the same
limits the workers were started with (it checks ranks and routes by them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.ops.settings import Settings
from tests.unit.test_deploy import K8S, ROOT, by_kind, env_of, render

MOUNT = "/adapters"
WORKERS = ("vllm-base", "vllm-instruct")


def flag(args: list[str], name: str) -> str:
    """The value after `name` on a command line."""
    assert name in args, (name, args)
    return args[args.index(name) + 1]


def adapter_mount(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The pod's adapters volume as the container mounts it (read-only, at MOUNT)."""
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == MOUNT]
    assert mount["readOnly"] is True
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim: dict[str, Any] = volume["persistentVolumeClaim"]
    return claim


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_every_worker_and_gateway_pod_mounts_one_shared_adapter_volume(overlay: str) -> None:
    documents = render(K8S / "overlays" / overlay)
    deployments = by_kind(documents, "Deployment")
    claims = set()
    for name in ("llm-gateway", *WORKERS):
        pod = deployments[name]["spec"]["template"]["spec"]
        claims.add(adapter_mount(pod, pod["containers"][0])["claimName"])
    [claim] = claims  # the gateway checks the very folders the workers load
    volume = by_kind(documents, "PersistentVolumeClaim")[claim]["spec"]
    assert volume["accessModes"] == ["ReadWriteMany"]  # pods on every node


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_workers_take_adapters_at_runtime_within_the_limits_the_gateway_knows(
    overlay: str, tmp_path: Path
) -> None:
    documents = render(K8S / "overlays" / overlay)
    deployments = by_kind(documents, "Deployment")
    models_file = tmp_path / "models.yaml"
    models_file.write_text(by_kind(documents, "ConfigMap")["llm-gateway-models"]["data"]["models.yaml"])
    models = {model.name: model for model in Settings(models_file=models_file).models}
    for worker in WORKERS:
        container = deployments[worker]["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        assert "--enable-lora" in args
        # An instruct adapter's own chat template travels with each chat request.
        assert "--trust-request-chat-template" in args
        assert env_of(container)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        spec = models[flag(args, "--served-model-name")]
        assert spec.lora_enabled
        assert spec.lora_max_rank == int(flag(args, "--max-lora-rank"))
        assert spec.lora_slots == (int(flag(args, "--max-loras")), int(flag(args, "--max-cpu-loras")))
        assert "--lora-modules" not in args  # the gateway loads adapters where requests need them


def test_compose_shares_the_adapter_folder_and_enables_lora(monkeypatch: pytest.MonkeyPatch) -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    monkeypatch.setenv("BASE_MODEL", "org/base-model")
    monkeypatch.setenv("INSTRUCT_MODEL", "org/instruct-model")
    models = {m.name: m for m in Settings(models_file=ROOT / "deploy" / "compose" / "models.gpu.yaml").models}
    for worker in WORKERS:
        service = services[worker]
        assert any(str(volume).endswith(f":{MOUNT}:ro") for volume in service["volumes"])
        assert service["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
        args = service["command"]
        spec = models[flag(args, "--served-model-name")]
        assert "--enable-lora" in args and "--trust-request-chat-template" in args
        assert spec.lora_enabled and spec.lora_max_rank == int(flag(args, "--max-lora-rank"))
        assert spec.lora_slots == (int(flag(args, "--max-loras")), int(flag(args, "--max-cpu-loras")))
    for gateway in ("gateway", "all-in-one"):
        assert any(str(volume).endswith(f":{MOUNT}:ro") for volume in services[gateway]["volumes"])

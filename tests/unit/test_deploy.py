"""Deployment files: every Kubernetes manifest validates against the Kubernetes schemas (strict),
the compose file against the compose-spec schema, and both agree with the gateway's own config."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.ops.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = kubernetes_validate.latest_version()
ALLOWED_KUSTOMIZE_KEYS = {"apiVersion", "kind", "resources", "labels", "images"}


def render(directory: Path) -> list[dict[str, Any]]:
    """The resources a kustomization applies. Only plain `resources` (plus labels and image tags,
    which change no structure) are used, so reading them is rendering them."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= ALLOWED_KUSTOMIZE_KEYS, set(kustomization) - ALLOWED_KUSTOMIZE_KEYS
    documents: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = directory / entry
        if path.is_dir():
            documents += render(path)
        else:
            documents += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return documents


def by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_every_manifest_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    documents = render(K8S / "overlays" / overlay)
    for document in documents:
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked below, not in the core schemas
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    kinds = sorted(doc["kind"] for doc in documents)
    assert kinds == sorted(
        ["Deployment"] * 3 + ["Service"] * 3 + ["Secret"] * 2 + ["ConfigMap"] * 2
        + ["PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy"]
        + ["PersistentVolumeClaim"]
    )  # fmt: skip


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_topology_is_what_the_gateway_expects(
    overlay: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    documents = render(K8S / "overlays" / overlay)
    deployments, services = by_kind(documents, "Deployment"), by_kind(documents, "Service")
    assert deployments["llm-gateway"]["spec"]["replicas"] >= 2
    for model in ("base", "instruct"):
        assert services[f"vllm-{model}"]["spec"]["clusterIP"] == "None"  # headless: one address per pod
        container = deployments[f"vllm-{model}"]["spec"]["template"]["spec"]["containers"][0]
        assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)
        limits = container["resources"]["limits"]
        assert ("nvidia.com/gpu" in limits) == (overlay == "gpu")
    monitor = by_kind(documents, "ServiceMonitor")["llm-gateway"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == services["llm-gateway"]["spec"]["selector"]
    models_yaml = by_kind(documents, "ConfigMap")["llm-gateway-models"]["data"]["models.yaml"]
    models_file = tmp_path / "models.yaml"
    models_file.write_text(models_yaml)
    settings = Settings(models_file=models_file)
    assert {(m.name, m.kind.value, str(m.urls[0])) for m in settings.models} == {
        ("base", "base", "http://vllm-base:8000/"), ("instruct", "instruct", "http://vllm-instruct:8000/"),
    }  # fmt: skip
    hpa = by_kind(documents, "HorizontalPodAutoscaler")["llm-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "llm-gateway"


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_a_rollout_drains_without_refusing_requests(overlay: str) -> None:
    """preStop keeps the pod serving while its endpoint is removed; the grace period covers the
    preStop sleep, the accept window and the drain."""
    pod = by_kind(render(K8S / "overlays" / overlay), "Deployment")["llm-gateway"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    env = {item["name"]: item.get("value") for item in container["env"]}
    drain = float(env.get("GATEWAY_DRAIN_TIMEOUT") or Settings().drain_timeout)
    window = float(env.get("GATEWAY_DRAIN_ACCEPT_WINDOW") or Settings().drain_accept_window)
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + window + drain + 5


def test_prometheus_scrapes_metrics_with_an_admin_key_no_client_holds() -> None:
    documents = render(K8S / "base")
    endpoint = by_kind(documents, "ServiceMonitor")["llm-gateway"]["spec"]["endpoints"][0]
    credentials = endpoint["authorization"]["credentials"]
    secret = by_kind(documents, "Secret")[credentials["name"]]["stringData"]
    env = env_of(by_kind(documents, "Deployment")["llm-gateway"]["spec"]["template"]["spec"]["containers"][0])
    admin = env["GATEWAY_ADMIN_KEYS"]["secretKeyRef"]
    assert admin["name"] == credentials["name"]
    assert secret[credentials["key"]] in secret[admin["key"]].split(",")
    assert secret[credentials["key"]] not in secret["api-keys"].split(",")  # tenants cannot read it
    settings = Settings(api_keys=secret["api-keys"], admin_keys=secret[admin["key"]])  # type: ignore[arg-type]
    assert settings.metrics_need_admin_key


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_the_gateway_leaves_the_service_only_when_it_can_serve_no_model(overlay: str) -> None:
    pod = by_kind(render(K8S / "overlays" / overlay), "Deployment")["llm-gateway"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready?any"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"


def test_compose_file_validates_against_the_compose_spec() -> None:
    schema_file = files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    jsonschema.validate(compose, schema)
    services = compose["services"]
    assert services["vllm-base"]["profiles"] == ["gpu"] and services["all-in-one"]["profiles"] == ["cpu"]
    devices = services["vllm-instruct"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert {"prometheus", "grafana"} <= set(services)


def test_the_tracing_profile_wires_gateway_and_workers_to_the_collector() -> None:
    schema_file = files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["otel-collector"]["profiles"] == services["jaeger"]["profiles"] == ["tracing"]
    for gateway in ("gateway", "all-in-one"):
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" in services[gateway]["environment"]
    collector = yaml.safe_load((ROOT / "deploy" / "otel" / "collector.yaml").read_text())
    assert collector["service"]["pipelines"]["traces"]["exporters"][0] == "otlp/jaeger"
    override = yaml.safe_load((ROOT / "deploy" / "compose" / "tracing.gpu.yml").read_text())
    jsonschema.validate(override, schema)
    for vllm in ("vllm-base", "vllm-instruct"):
        command = override["services"][vllm]["command"]
        assert command[command.index("--otlp-traces-endpoint") + 1] == "http://otel-collector:4317"
        assert command[: len(services[vllm]["command"])] == services[vllm]["command"]  # the rest unchanged


def test_compose_models_file_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASE_MODEL", "org/base-model")
    monkeypatch.setenv("INSTRUCT_MODEL", "org/instruct-model")
    settings = Settings(models_file=ROOT / "deploy" / "compose" / "models.gpu.yaml")
    assert [m.tokenizer for m in settings.models] == ["org/base-model", "org/instruct-model"]


def test_dockerfile_is_non_root_with_a_healthcheck_and_both_targets() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "AS gateway" in dockerfile and "AS cpu" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/health" in dockerfile
    last_user = [line for line in dockerfile.splitlines() if line.startswith("USER ")][-1]
    assert last_user != "USER root"


def test_the_validation_catches_a_typo() -> None:
    deployment = by_kind(render(K8S / "overlays" / "cpu"), "Deployment")["llm-gateway"]
    deployment["spec"]["replicass"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def labels_match(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_only_the_gateway_and_prometheus_reach_the_workers(overlay: str) -> None:
    documents = render(K8S / "overlays" / overlay)
    deployments = by_kind(documents, "Deployment")
    policy = by_kind(documents, "NetworkPolicy")["vllm-workers"]["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    selected = {name for name, d in deployments.items() if labels_match(policy["podSelector"], pod_labels(d))}
    assert selected == {"vllm-base", "vllm-instruct"}  # every worker pod, and no other
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
    gateway, prometheus = rule["from"]
    assert set(gateway) == {"podSelector"}  # the gateway's pods, in the workers' own namespace
    assert labels_match(gateway["podSelector"], pod_labels(deployments["llm-gateway"]))
    assert set(prometheus) == {"namespaceSelector", "podSelector"}  # both: a pod of that namespace only
    assert prometheus["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item.get("valueFrom") or item.get("value") for item in container["env"]}


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_workers_require_the_key_the_gateway_sends(overlay: str) -> None:
    documents = render(K8S / "overlays" / overlay)
    deployments = by_kind(documents, "Deployment")
    gateway = env_of(deployments["llm-gateway"]["spec"]["template"]["spec"]["containers"][0])
    reference = gateway["GATEWAY_WORKER_API_KEY"]["secretKeyRef"]
    secret = by_kind(documents, "Secret")[reference["name"]]["stringData"]
    assert secret[reference["key"]] and secret[reference["key"]] not in secret.get("api-keys", "")
    assert reference["name"] != "llm-gateway-keys"  # workers never see the clients' keys
    for model in ("base", "instruct"):
        container = deployments[f"vllm-{model}"]["spec"]["template"]["spec"]["containers"][0]
        assert env_of(container)["VLLM_API_KEY"]["secretKeyRef"] == reference
        assert "--api-key" not in container["args"]  # from the Secret, not on a command line
        # vLLM's --api-key guards /v1 (and /v2, /inference); the kubelet's probes must stay open.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health"
    Settings(api_keys="k", worker_api_key=secret[reference["key"]])  # type: ignore[arg-type]


GUARD_SOURCE = ROOT / "service" / "workers" / "worker_guard.py"
GUARD_CONFIGMAP = K8S / "base" / "worker-guard-configmap.yaml"


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_every_worker_loads_the_guard_that_closes_every_route_but_health(overlay: str) -> None:
    """vLLM's --api-key leaves /invocations and more open: each worker pod loads the workers' guard
    from a ConfigMap holding the gateway's own file, so vLLM's own image can import it."""
    documents = render(K8S / "overlays" / overlay)
    configmap = by_kind(documents, "ConfigMap")["llm-gateway-worker-guard"]["data"]
    assert configmap == {"llm_gateway_worker_guard.py": GUARD_SOURCE.read_text()}, (
        "the guard's ConfigMap is out of date: run `python -m tests.unit.test_deploy`"
    )
    for model in ("base", "instruct"):
        pod = by_kind(documents, "Deployment")[f"vllm-{model}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        args = container["args"]
        assert args[args.index("--middleware") + 1] == "llm_gateway_worker_guard.WorkerGuard"
        [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == env_of(container)["PYTHONPATH"]]
        [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == "llm-gateway-worker-guard"


def write_guard_configmap() -> None:
    """Rewrite the guard's ConfigMap from the gateway's file (its comment header kept)."""
    text = GUARD_CONFIGMAP.read_text()
    head = text[: text.index("  llm_gateway_worker_guard.py: |\n")]
    lines = GUARD_SOURCE.read_text().splitlines(keepends=True)
    body = "".join(f"    {line}" if line.strip() else "\n" for line in lines)
    GUARD_CONFIGMAP.write_text(f"{head}  llm_gateway_worker_guard.py: |\n{body}")


MONITORING = ("prometheus", "grafana", "otel-collector", "jaeger")


def test_compose_binds_the_unauthenticated_services_to_loopback() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name in MONITORING:
        ports = services[name]["ports"]
        assert ports and all(str(port).startswith("127.0.0.1:") for port in ports), (name, ports)
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == {*MONITORING, "gateway", "all-in-one"}  # no worker port is published
    for worker in ("vllm-base", "vllm-instruct"):
        assert services[worker]["environment"]["VLLM_API_KEY"] == "${WORKER_API_KEY:-}"
    for gateway in ("gateway", "all-in-one"):
        assert services[gateway]["environment"]["GATEWAY_WORKER_API_KEY"] == "${WORKER_API_KEY:-}"


def test_compose_workers_load_the_guard_from_the_gateways_own_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    override = yaml.safe_load((ROOT / "deploy" / "compose" / "tracing.gpu.yml").read_text())["services"]
    for worker in ("vllm-base", "vllm-instruct"):
        service = compose["services"][worker]
        for command in (service["command"], override[worker]["command"]):
            assert command[command.index("--middleware") + 1] == "llm_gateway_worker_guard.WorkerGuard"
        folder = service["environment"]["PYTHONPATH"]
        mounts = [volume.split(":") for volume in service["volumes"]]
        assert ["./service/workers/worker_guard.py", f"{folder}/llm_gateway_worker_guard.py", "ro"] in mounts


@pytest.mark.parametrize("overlay", ["gpu-postgres", "cpu-postgres"])
def test_the_postgresql_option_gives_every_gateway_pod_one_store(overlay: str) -> None:
    """The *-postgres overlays: the same topology plus a PostgreSQL the gateway's pods alone reach, its URL
    in a Secret the gateway reads (and the password PostgreSQL starts with, from the same Secret)."""
    from sqlalchemy.engine import make_url

    documents = render(K8S / "overlays" / overlay)
    for document in documents:
        if not document["apiVersion"].startswith("monitoring.coreos.com/"):
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    plain = render(K8S / "overlays" / overlay.removesuffix("-postgres"))
    assert len(documents) == len(plain) + 4  # the Secret, the StatefulSet, its Service, its NetworkPolicy
    gateway = by_kind(documents, "Deployment")["llm-gateway"]["spec"]["template"]["spec"]["containers"][0]
    reference = env_of(gateway)["GATEWAY_DATABASE_URL"]["secretKeyRef"]
    secret = by_kind(documents, "Secret")[reference["name"]]["stringData"]
    url = make_url(secret[reference["key"]])
    Settings(database_url=secret[reference["key"]])  # type: ignore[arg-type]
    postgres = by_kind(documents, "StatefulSet")["llm-gateway-postgres"]
    container = postgres["spec"]["template"]["spec"]["containers"][0]
    env = env_of(container)
    assert url.get_backend_name() == "postgresql" and url.drivername == "postgresql+psycopg"
    password = secret[env["POSTGRES_PASSWORD"]["secretKeyRef"]["key"]]
    assert (url.username, url.database, url.password) == (env["POSTGRES_USER"], env["POSTGRES_DB"], password)
    service = by_kind(documents, "Service")[str(url.host)]["spec"]
    assert service["ports"][0]["port"] == url.port
    assert labels_match({"matchLabels": service["selector"]}, pod_labels(postgres))
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    policy = by_kind(documents, "NetworkPolicy")["llm-gateway-postgres"]["spec"]
    [rule] = policy["ingress"]
    assert [set(peer) for peer in rule["from"]] == [{"podSelector"}]
    assert labels_match(
        rule["from"][0]["podSelector"], pod_labels(by_kind(documents, "Deployment")["llm-gateway"])
    )


def test_without_the_postgresql_option_the_database_url_is_optional() -> None:
    gateway = by_kind(render(K8S / "base"), "Deployment")["llm-gateway"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    env = env_of(gateway)
    assert env["GATEWAY_DATABASE_URL"]["secretKeyRef"]["optional"] is True
    admin = env["GATEWAY_ADMIN_KEYS"]["secretKeyRef"]
    secret = by_kind(render(K8S / "base"), "Secret")[admin["name"]]["stringData"]
    assert not set(secret[admin["key"]].split(",")) & set(secret["api-keys"].split(","))  # never a client key


def test_the_compose_postgres_profile() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    postgres = services["postgres"]
    assert postgres["profiles"] == ["postgres"] and "ports" not in postgres and postgres["healthcheck"]
    assert "postgres-data" in compose["volumes"]
    for gateway in ("gateway", "all-in-one"):
        environment = services[gateway]["environment"]
        assert environment["GATEWAY_DATABASE_URL"] == "${GATEWAY_DATABASE_URL:-}"
        assert environment["GATEWAY_ADMIN_KEYS"] == "${GATEWAY_ADMIN_KEYS:-}"
        assert services[gateway]["depends_on"]["postgres"] == {
            "condition": "service_healthy",
            "required": False,
        }


if __name__ == "__main__":
    write_guard_configmap()

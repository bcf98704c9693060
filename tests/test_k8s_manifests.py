"""deploy/k8s/ builds, validates against the Kubernetes schemas, and tells the services only what they read.

There is no cluster and no kustomize here, so `build` below is a small kustomize: it follows `resources`
(files and directories with a kustomization.yaml), applies `namespace`, `images` and strategic-merge
`patches` (by path), and refuses any other field, so an overlay cannot use a feature this test would silently
skip. Every resource of every build is validated offline with kubernetes-validate against a fixed Kubernetes
version's schemas (strict: an unknown field is an error). Then the clawhub parts are checked against the code:
every CLAWHUB_* variable exists in services/ (or is in PENDING), each Deployment's environment is accepted by
its service's own `Settings.from_env`, probes ask for health names the servers register, addresses name the
build's Services on their ports, and the executors' memory limit covers their sandbox limits.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BUILDS = ("base", "overlays/local", "overlays/mesh")
# The schemas the manifests are validated against: the oldest Kubernetes the pinned kubernetes-validate
# (pyproject.toml: >=1.33) is sure to carry; native gRPC probes are GA since 1.27.
KUBERNETES_VERSION = "1.33.0"
NAMESPACE = "clawhub"
REPLICAS = {"gateway": 2, "dispatcher": 2, "executor": 3, "registry": 2, "deployer": 2}
PORTS = {"gateway": 50051, "registry": 50052, "deployer": 50053, "dispatcher": 50054, "executor": 50055}
# The Services clients balance over themselves (`dns:///` addresses): every one but the public gateway's.
HEADLESS = {"registry", "deployer", "dispatcher", "executor"}
# Secrets the operator creates (docs/deploy.md shows the command for each); an overlay may bring its own.
OPERATOR_SECRETS = {"clawhub-service-tokens", "clawhub-admin-key", "clawhub-deployer-secrets-key",
                    "clawhub-database", "clawhub-redis"}
# What the executors' memory limit allows beyond the sandbox's own bounds: the interpreter, wasmtime, gRPC
# buffers (an idle executor's RSS is about 80 MiB). deploy/k8s/base/executor.yaml shows the sum.
EXECUTOR_OVERHEAD = 256 * 1024 * 1024

# Variables the manifests set that the services do not read yet: being added in parallel (issue 15). Remove a
# name once services/ reads it (test_pending_names_are_not_in_the_services_yet says when).
PENDING: set[str] = set()

Resource = dict[str, Any]


# A small kustomize.

SUPPORTED = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition", "PriorityClass"}


def load_documents(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def key(resource: Resource) -> tuple[str, str]:
    return resource["kind"], resource["metadata"]["name"]


def build(directory: Path) -> list[Resource]:
    """What `kustomize build directory` gives, for the fields SUPPORTED."""
    kustomization = load_documents(directory / "kustomization.yaml")[0]
    unsupported = set(kustomization) - SUPPORTED
    assert not unsupported, f"{directory}: this test's kustomize does not apply {sorted(unsupported)}"
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        resources += build(path) if path.is_dir() else load_documents(path)
    seen = [key(r) for r in resources]
    assert len(seen) == len(set(seen)), f"{directory}: a resource is defined twice: {sorted(seen)}"
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{directory}: only strategic-merge patches by path are applied"
        for patch in load_documents(directory / patch_entry["path"]):
            targets = [i for i, r in enumerate(resources) if key(r) == key(patch)]
            assert targets, f"{directory}: {patch_entry['path']} patches {key(patch)}, not in the build"
            resources[targets[0]] = merge(resources[targets[0]], patch)
    for image in kustomization.get("images", []):
        assert set(image) <= {"name", "newName", "newTag"}, f"{directory}: images takes name, newName, newTag"
        for container in all_containers(resources):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    return resources


def merge(target: Any, patch: Any) -> Any:
    """A strategic merge patch as Kubernetes applies it to these fields: maps merge key by key (null deletes),
    lists of named objects (containers, env, volumes, mounts, ports) merge by name, other lists are replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(target)
        for field, value in patch.items():
            if value is None:
                merged.pop(field, None)
            else:
                merged[field] = merge(merged[field], value) if field in merged else copy.deepcopy(value)
        return merged
    if (isinstance(target, list) and isinstance(patch, list)
            and all(isinstance(item, dict) and "name" in item for item in [*target, *patch])):
        merged_list = copy.deepcopy(target)
        names = [item["name"] for item in merged_list]
        for item in patch:
            if item["name"] in names:
                index = names.index(item["name"])
                merged_list[index] = merge(merged_list[index], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def pod_specs(resources: list[Resource]) -> Iterator[dict[str, Any]]:
    for resource in resources:
        if resource["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield resource["spec"]["template"]["spec"]


def all_containers(resources: list[Resource]) -> Iterator[dict[str, Any]]:
    for spec in pod_specs(resources):
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


@pytest.fixture(scope="module", params=BUILDS)
def built(request: pytest.FixtureRequest) -> tuple[str, list[Resource]]:
    return request.param, build(K8S / request.param)


def of_kind(resources: list[Resource], kind: str) -> dict[str, Resource]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def clawhub_deployments(resources: list[Resource]) -> dict[str, Resource]:
    return {name: d for name, d in of_kind(resources, "Deployment").items()
            if d["metadata"]["labels"].get("app.kubernetes.io/part-of") == "clawhub"}


def main_container(deployment: Resource) -> dict[str, Any]:
    name = deployment["metadata"]["name"]
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (container,) = [c for c in containers if c["name"] == name]
    return container


# The loader itself.

def test_merge_is_a_strategic_merge() -> None:
    env = [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]
    target: dict[str, Any] = {"spec": {"containers": [{"name": "a", "env": env, "args": ["p", "q"],
                                                       "resources": {"limits": {"cpu": "1"}}}]}}
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}],
                                      "args": ["r"], "resources": {"limits": {"memory": "1Gi"}}},
                                     {"name": "b", "image": "i"}]}}
    merged = merge(target, patch)
    (a, b) = merged["spec"]["containers"]
    assert a["env"] == [{"name": "X", "value": "1"}, {"name": "Y", "value": "3"}, {"name": "Z", "value": "4"}]
    assert a["args"] == ["r"] and a["resources"]["limits"] == {"cpu": "1", "memory": "1Gi"} and b["image"] == "i"
    assert merge({"probe": {"grpc": {"port": 1}}}, {"probe": {"grpc": None, "exec": {}}}) == {"probe": {"exec": {}}}
    assert target["spec"]["containers"][0]["env"][1]["value"] == "2", "the target is left as it was"


def test_the_loader_refuses_what_it_does_not_apply(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nconfigMapGenerator: []\n")
    with pytest.raises(AssertionError, match="configMapGenerator"):
        build(tmp_path)


# Schemas.

def test_every_resource_validates_against_the_kubernetes_schemas(built: tuple[str, list[Resource]]) -> None:
    name, resources = built
    assert resources, name
    problems = []
    for resource in resources:
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{key(resource)} at {'.'.join(str(p) for p in exc.path)}: {exc.message[:300]}")
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_the_validation_catches_a_mistake() -> None:
    deployment = copy.deepcopy(clawhub_deployments(build(K8S / "base"))["gateway"])
    main_container(deployment)["readinessProbe"]["grpc"]["port"] = "grpc"  # a gRPC probe takes a number
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


# The topology.

def test_every_service_runs_its_replicas_with_probes_resources_and_a_pdb(built: tuple[str, list[Resource]]) -> None:
    from services.deployer.server import SERVICE_NAME as DEPLOYER
    from services.dispatcher.server import SERVICE_NAME as DISPATCHER
    from services.executor.server import EXECUTOR_SERVICE
    from services.gateway.server import GATEWAY_SERVICE
    from services.registry.server import SERVICE_NAME as REGISTRY

    # The name each server reports its own health under (services/*/server.py).
    health_names = {"gateway": GATEWAY_SERVICE.full_name, "dispatcher": DISPATCHER, "deployer": DEPLOYER,
                    "executor": EXECUTOR_SERVICE.full_name, "registry": REGISTRY}
    build_name, resources = built
    deployments = clawhub_deployments(resources)
    assert {n: d["spec"]["replicas"] for n, d in deployments.items()} == REPLICAS, build_name
    pdbs = list(of_kind(resources, "PodDisruptionBudget").values())
    for name, deployment in deployments.items():
        where = f"{build_name}: {name}"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), where
        container = main_container(deployment)
        assert container["command"] == ["python", "-m", f"services.{name}"], where
        assert (ROOT / "services" / name / "__main__.py").is_file()
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == PORTS[name], where
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            grpc_probe = container[probe]["grpc"]
            assert grpc_probe["port"] == ports["grpc"], f"{where}: {probe}"
            # "" is the overall status; anything else must be a name the server sets.
            assert grpc_probe["service"] in ("", health_names[name]), f"{where}: {probe}"
        assert container["readinessProbe"]["grpc"]["service"] == health_names[name], where
        for each in [*deployment["spec"]["template"]["spec"].get("initContainers", []), container]:
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(each["resources"][part]), f"{where}: {each['name']} {part}"
            assert quantity(each["resources"]["requests"]["memory"]) <= quantity(each["resources"]["limits"]["memory"])
        covering = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{where}: {len(covering)} PodDisruptionBudgets"
        budget = covering[0]["spec"]
        assert budget.get("maxUnavailable", 0) >= 1 or budget["minAvailable"] < REPLICAS[name], where
        assert budget.get("maxUnavailable", 0) < REPLICAS[name], f"{where}: the budget would let every pod go"


def test_every_service_port_is_named_grpc_and_reaches_its_pods(built: tuple[str, list[Resource]]) -> None:
    build_name, resources = built
    deployments = clawhub_deployments(resources)
    services = {n: s for n, s in of_kind(resources, "Service").items()
                if s["metadata"]["labels"].get("app.kubernetes.io/part-of") == "clawhub"}
    assert set(services) == set(PORTS), build_name
    for name, service in services.items():
        where = f"{build_name}: Service {name}"
        assert [p["name"] for p in service["spec"]["ports"]] == ["grpc"], where
        assert service["spec"]["ports"][0]["port"] == PORTS[name], where
        assert service["spec"]["ports"][0]["targetPort"] == "grpc", where
        assert (service["spec"].get("clusterIP") == "None") == (name in HEADLESS), where
        selected = [d for d in deployments.values()
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert [d["metadata"]["name"] for d in selected] == [name], where


def test_addresses_name_the_builds_services_on_their_ports(built: tuple[str, list[Resource]]) -> None:
    from services.runtime.channels import grpc_target

    build_name, resources = built
    config = of_kind(resources, "ConfigMap")["clawhub-config"]["data"]
    services = of_kind(resources, "Service")
    for variable, service in (("CLAWHUB_REGISTRY_ADDRESS", "registry"), ("CLAWHUB_DEPLOYER_ADDRESS", "deployer"),
                              ("CLAWHUB_DISPATCHER_ADDRESS", "dispatcher"),
                              ("CLAWHUB_EXECUTOR_ADDRESSES", "executor")):
        grpc_target(config[variable])  # a form the channels take
        match = re.fullmatch(r"dns:///([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", config[variable])
        assert match, f"{build_name}: {variable}={config[variable]}"
        assert match[1] == service and match[1] in services, f"{build_name}: {variable}"
        assert match[2] == services[service]["metadata"]["namespace"] == NAMESPACE, f"{build_name}: {variable}"
        assert int(match[3]) == services[service]["spec"]["ports"][0]["port"], f"{build_name}: {variable}"
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == NAMESPACE, f"{build_name}: {key(resource)}"
    assert [n["metadata"]["name"] for n in of_kind(resources, "Namespace").values()] == [NAMESPACE]


# The environment against the code.

def services_source() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "services").rglob("*.py")))


def environment(resources: list[Resource], container: dict[str, Any]) -> dict[str, Any]:
    """The container's variables by name: what its envFrom ConfigMaps give, then its own env entries."""
    config_maps = of_kind(resources, "ConfigMap")
    variables: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        variables.update(config_maps[source["configMapRef"]["name"]]["data"])
    for entry in container.get("env", []):
        variables[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return variables


def test_every_clawhub_variable_is_one_the_services_read(built: tuple[str, list[Resource]]) -> None:
    build_name, resources = built
    source = services_source()
    for container in all_containers(resources):
        for name in environment(resources, container):
            if name.startswith("CLAWHUB_") and name not in PENDING:
                assert re.search(rf"\b{name}\b", source), f"{build_name}: {container['name']} sets {name}, " \
                                                          "which nothing in services/ reads"


def test_pending_names_are_not_in_the_services_yet() -> None:
    source = services_source()
    landed = sorted(name for name in PENDING if re.search(rf"\b{name}\b", source))
    assert not landed, f"services/ reads {landed} now: remove them from PENDING"


def test_each_deployment_environment_is_accepted_by_its_services_settings(
        built: tuple[str, list[Resource]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Deployment's variables, as Kubernetes would give them (Secrets and the pod's fields filled with
    stand-ins, the secret files where the init container puts them), read by its service's Settings.from_env:
    a value the service refuses (a size, a choice, a rate-limit setting) fails here, not in a crash loop."""
    import importlib
    import os

    from services.runtime.identity import write_credentials

    build_name, resources = built
    secrets_dir = tmp_path / "secrets"
    write_credentials(secrets_dir)
    stand_ins = {("clawhub-database", "url"): "postgresql://clawhub@postgres:5432/clawhub",
                 ("clawhub-redis", "url"): "redis://redis:6379/0"}
    fields = {"metadata.name": "pod-0", "status.podIP": "10.1.2.3"}
    for name, deployment in clawhub_deployments(resources).items():
        container = main_container(deployment)
        mounted = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/run/clawhub/secrets" in mounted, name
        values: dict[str, str] = {}
        for variable, value in environment(resources, container).items():
            if isinstance(value, dict):
                ref = value.get("secretKeyRef") or value.get("fieldRef")
                assert ref is not None, f"{name}: {variable}"
                value = stand_ins[(ref["name"], ref["key"])] if "secretKeyRef" in value else fields[ref["fieldPath"]]
            # $(VAR) takes a variable defined before it in the list, as Kubernetes expands it.
            for reference in re.findall(r"\$\((\w+)\)", value):
                assert reference in values, f"{name}: {variable} refers to $({reference}), not defined before it"
                value = value.replace(f"$({reference})", values[reference])
            values[variable] = value.replace("/run/clawhub/secrets/service.token",
                                             str(secrets_dir / f"{name}.token")).replace(
                "/run/clawhub/secrets/", f"{secrets_dir}/")
        for variable in [v for v in os.environ if v.startswith(("CLAWHUB_", "OTEL_"))]:
            monkeypatch.delenv(variable)
        for variable, value in values.items():
            monkeypatch.setenv(variable, value)
        settings = importlib.import_module(f"services.{name}.settings").Settings.from_env()
        assert settings.port == PORTS[name] and settings.host == "0.0.0.0", f"{build_name}: {name}"
        assert settings.identity is not None and settings.identity.service == name, "internal auth stays on"
        assert settings.metrics.enabled and settings.metrics.host == "0.0.0.0", f"{build_name}: {name}"
        assert settings.rate_limits is not None and settings.rate_limits.backend == "redis", f"{build_name}: {name}"
        if name in ("registry", "deployer"):
            from services.runtime.postgres import database_url

            assert database_url(name).startswith("postgresql://"), f"{build_name}: {name} keeps sqlite"
        if name == "executor":
            assert settings.kv_redis_url, "the executors share one kv store"
            check_executor_memory(build_name, deployment, settings)


def quantity(text: str | int) -> float:
    """A Kubernetes quantity (`1792Mi`, `2`, `250m`, `1Gi`) as a number (bytes, or cores)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "m": 1e-3}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(text))
    assert match and match[2] in (*units, ""), text
    return float(match[1]) * units.get(match[2], 1)


def check_executor_memory(build_name: str, deployment: Resource, settings: Any) -> None:
    resources = main_container(deployment)["resources"]
    limit = quantity(resources["limits"]["memory"])
    needed = (settings.threads * settings.max_memory + settings.cache_bytes + settings.queue * settings.max_input
              + settings.threads * (settings.max_output + settings.max_stderr) + EXECUTOR_OVERHEAD)
    assert limit >= needed, (f"{build_name}: the executors' memory limit {resources['limits']['memory']} is below "
                             f"their sandbox's bounds ({needed / 2**20:.0f} MiB)")
    # Not grossly above either: the arithmetic in the manifest is what sized it.
    assert limit <= needed * 1.25, f"{build_name}: {resources['limits']['memory']} for {needed / 2**20:.0f} MiB"
    # A pod sees the node's CPUs: the threads must be set, to the CPU limit.
    assert settings.threads == quantity(resources["limits"]["cpu"]), build_name


def test_the_executor_memory_check_fails_on_an_undersized_limit() -> None:
    from services.executor.settings import Settings

    deployment = copy.deepcopy(clawhub_deployments(build(K8S / "base"))["executor"])
    check_executor_memory("base", deployment, Settings(threads=2, queue=32))
    with pytest.raises(AssertionError, match="below their sandbox"):
        check_executor_memory("base", deployment, Settings(threads=2, queue=32, max_memory=1024 * 2**20))


# Secrets, dependencies, overlays.

def test_secrets_are_referenced_by_name_and_created_as_documented(built: tuple[str, list[Resource]],
                                                                    tmp_path: Path) -> None:
    from services.runtime.identity import write_credentials

    build_name, resources = built
    in_build = set(of_kind(resources, "Secret"))
    referenced: dict[str, set[str]] = {}
    for spec in pod_specs(resources):
        for volume in spec.get("volumes", []):
            for source in volume.get("projected", {}).get("sources", []):
                if "secret" in source:
                    referenced.setdefault(source["secret"]["name"], set()).update(
                        item["key"] for item in source["secret"]["items"])
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for entry in container.get("env", []):
                if ref := entry.get("valueFrom", {}).get("secretKeyRef"):
                    referenced.setdefault(ref["name"], set()).add(ref["key"])
    assert set(referenced) == OPERATOR_SECRETS, build_name
    deploy_doc = (ROOT / "docs" / "deploy.md").read_text()
    for name in set(referenced) - in_build:
        assert f"kubectl create secret generic {name}" in deploy_doc, f"docs/deploy.md does not create {name}"
    for name in set(referenced) & in_build:
        secret = of_kind(resources, "Secret")[name]
        data = secret.get("stringData") or secret.get("data") or {}
        assert referenced[name] <= set(data), f"{build_name}: {name}"
    # The tokens' keys are the files `python -m services.runtime.identity DIR` writes (what the docs load).
    write_credentials(tmp_path)
    assert referenced["clawhub-service-tokens"] == {p.name for p in tmp_path.iterdir()}


def test_base_leaves_postgresql_and_redis_to_the_operator_and_local_brings_them() -> None:
    base = build(K8S / "base")
    assert not of_kind(base, "Secret") and not of_kind(base, "StatefulSet"), "the base deploys no dependency"
    assert all("postgres" not in c["image"] and "redis" not in c["image"] for c in all_containers(base))
    local = build(K8S / "overlays" / "local")
    secrets = of_kind(local, "Secret")
    services = of_kind(local, "Service")
    for secret, service in (("clawhub-database", "postgres"), ("clawhub-redis", "redis")):
        url = secrets[secret]["stringData"]["url"]
        host = re.search(r"@?([a-z0-9.-]+):(\d+)/", url.split("//", 1)[1])
        assert host and host[1] == f"{service}.{NAMESPACE}.svc.cluster.local", url
        assert int(host[2]) == services[service]["spec"]["ports"][0]["port"], url
        assert services[service]["spec"]["selector"].items() <= \
            of_kind(local, "StatefulSet")[service]["spec"]["template"]["metadata"]["labels"].items()
    clawhub_images = {c["image"] for c in all_containers(local) if c["image"].startswith("clawhub")}
    assert clawhub_images == {"clawhub:dev"}, clawhub_images
    # The executor patch merged into the base's container: its own settings changed, the others kept.
    executor = environment(local, main_container(clawhub_deployments(local)["executor"]))
    assert executor["CLAWHUB_EXECUTOR_THREADS"] == "1" and "CLAWHUB_KV_REDIS_URL" in executor


def test_mesh_overlay_marks_the_namespace_and_keeps_plaintext_and_tokens() -> None:
    resources = build(K8S / "overlays" / "mesh")
    (namespace,) = of_kind(resources, "Namespace").values()
    assert namespace["metadata"]["annotations"]["linkerd.io/inject"] == "enabled"
    for container in all_containers(resources):
        names = set(environment(resources, container))
        assert not {n for n in names if n.startswith("CLAWHUB_TLS_")}, "the mesh encrypts"
        assert "CLAWHUB_INTERNAL_AUTH" not in names, "the tokens stay on inside a mesh"


def test_the_image_is_the_repositorys_dockerfile() -> None:
    """No Docker engine here: the Dockerfile is read. The pods run its Python with `python -m services.X`, and
    their init container its `sh` and `install` (coreutils, in the Debian-based slim image)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert "pip install" in dockerfile and "COPY services services" in dockerfile
    for container in all_containers(build(K8S / "base")):
        assert container["image"] == "clawhub:latest" and container["imagePullPolicy"] == "IfNotPresent"

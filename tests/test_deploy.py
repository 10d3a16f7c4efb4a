"""The deployment files, checked without an engine or a cluster (see tests/deployment.py),
and kept in step with each other and with the code they run."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from deployment import (
    COMPOSE,
    K8S,
    REPO,
    check_compose,
    compose_file,
    interpolate,
    k8s_documents,
    parse_duration_s,
    validate_k8s,
)

from shared.control import pipeline
from shared.control.redis_urls import parse_sentinel
from shared.control.settings import Settings


def test_the_compose_file_is_valid_compose(tmp_path: Path) -> None:
    checked = check_compose(COMPOSE)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # and the check can fail: a misspelt key in the workers' shared block
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period:", "stop_grace_perod:", 1))
    checked = check_compose(broken)
    assert checked.returncode != 0
    assert "stop_grace_perod" in checked.stdout + checked.stderr


def test_every_kubernetes_object_is_valid_for_its_schema() -> None:
    kinds = []
    for path, doc in k8s_documents():
        try:
            validate_k8s(doc)
        except ValueError as exc:
            pytest.fail(f"{path.name}: {exc}")
        kinds.append(doc["kind"])
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap", "ScaledObject"} <= set(kinds)


@pytest.mark.parametrize(
    ("kind", "break_it", "says"),
    [
        ("Deployment", lambda d: d["spec"].update(replicas="two"), "'two' is not of type"),
        ("Deployment", lambda d: d["spec"].update(replicaz=1), "replicaz"),
        ("ScaledObject", lambda d: d["spec"].update(minReplicaCount="zero"), "'zero'"),
        ("ScaledObject", lambda d: d["spec"].update(pollingIntervall=5), "pollingIntervall"),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0].pop("type"), "'type'"),
    ],
)
def test_the_kubernetes_checks_can_fail(kind, break_it, says) -> None:
    doc = copy.deepcopy(next(d for _, d in k8s_documents() if d["kind"] == kind))
    break_it(doc)
    with pytest.raises(ValueError, match=says):
        validate_k8s(doc)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


def workloads() -> dict[str, dict]:
    return {
        doc["metadata"]["name"]: doc
        for _, doc in k8s_documents()
        if doc["kind"] in ("Deployment", "StatefulSet")
    }


def test_kubernetes_runs_the_commands_and_settings_compose_runs() -> None:
    """The compose file's commands are the ones a test runs as processes
    (test_compose_e2e); Kubernetes must run the same (flower's auth aside: there it
    comes from a Secret) with settings the fleet accepts."""
    services = compose_file()["services"]
    for name in ("dense-worker", "sparse-worker", "aggregate-worker", "queue-exporter"):
        container = workloads()[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == services[name]["command"], name
    flower = workloads()["flower"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert flower == services["flower"]["command"][:-1]  # without --basic-auth=...
    config = next(d for _, d in k8s_documents() if d["kind"] == "ConfigMap")["data"]
    for doc in workloads().values():
        pod = doc["spec"]["template"]["spec"]
        container = pod["containers"][0]
        if container.get("command", [""])[0] not in ("celery", "embed-collections"):
            continue  # Redis, the store
        refs = {ref.get("secretRef", {}).get("name") for ref in container["envFrom"]}
        assert "embed-fleet-redis" in refs, f"{doc['metadata']['name']} lacks REDIS_URL"
        own = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        settings = Settings.from_env({**config, **own})  # a bad value fails, naming it
        if "worker" in container["command"]:
            grace = pod["terminationGracePeriodSeconds"]
            assert grace >= settings.stop_timeout + 10, doc["metadata"]["name"]
    env = services["dense-worker"]["environment"]
    stop = float(interpolate(env["EMBED_FLEET_STOP_TIMEOUT"], {}))
    for name, service in services.items():
        if "worker" in service.get("command", []):
            assert parse_duration_s(service["stop_grace_period"]) >= stop + 10, name


CREDENTIAL = re.compile(r"PASSWORD|SECRET|KEY_ID|BASIC_AUTH|REDIS_URL|TOKEN")


def test_no_credential_is_written_into_the_kubernetes_manifests() -> None:
    """Credentials come from Secrets by reference; no manifest holds one, or is one."""
    for path, doc in k8s_documents():
        assert doc["kind"] != "Secret", path.name
        for key, value in (doc.get("data") or {}).items():
            assert not CREDENTIAL.search(key), f"{path.name}: {key} belongs in a Secret"
            assert not re.search(r"://[^/@]+@", str(value)), f"{path.name}: {key} has a password"
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("containers", []):
            for entry in container.get("env", []):
                if CREDENTIAL.search(entry["name"]):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), (path.name, entry)


def test_scalers_read_what_the_exporter_serves() -> None:
    exporter = workloads()["queue-exporter"]["spec"]["template"]["spec"]["containers"][0]
    port = int(exporter["command"][-1])
    service = next(
        d
        for _, d in k8s_documents()
        if d["kind"] == "Service" and d["metadata"]["name"] == "queue-exporter"
    )
    assert service["spec"]["ports"][0]["port"] == port
    targets = set()
    for _, doc in k8s_documents():
        if doc["kind"] != "ScaledObject":
            continue
        deployment = workloads()[doc["spec"]["scaleTargetRef"]["name"]]
        consumed = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
        queues = consumed[consumed.index("-Q") + 1].split(",")
        for trigger in doc["spec"]["triggers"]:
            meta = trigger["metadata"]
            assert trigger["type"] == "metrics-api"
            assert meta["url"] == f"http://queue-exporter.embed-fleet.svc:{port}/queues"
            root, queue, field = meta["valueLocation"].split(".")
            assert (root, field) == ("queues", "backlog") and queue in pipeline.QUEUES
            assert queue in queues, f"{doc['metadata']['name']} scales on a queue it does not serve"
            targets.add(queue)
    assert targets == set(pipeline.QUEUES)  # every queue wakes some worker


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}/${EMPTY:-d}/${UNSET:-d}", env) == "x/d/d"
    assert interpolate("${EMPTY-d}/${UNSET-d}/$${SET}", env) == "/d/${SET}"
    with pytest.raises(KeyError, match="set FLOWER_PASSWORD"):
        interpolate("${FLOWER_PASSWORD:?set FLOWER_PASSWORD}", env)
    assert parse_duration_s("1m30s") == 90 and parse_duration_s("45s") == 45


def test_the_dockerfile_builds_from_what_the_repository_holds() -> None:
    """Without an engine to build it: every COPY source exists, the extras it installs
    are declared, and every program the deployment files start is installed by it."""
    import tomllib

    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")  # join continuations
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("#")]
    known = {"FROM", "ARG", "ENV", "WORKDIR", "RUN", "COPY", "USER", "STOPSIGNAL", "CMD"}
    assert {line.split()[0] for line in lines} <= known
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert 'pip install ".[flower]"' in (REPO / "Dockerfile").read_text()
    assert "flower" in project["optional-dependencies"]
    programs = {"celery"} | set(project["scripts"])
    services = compose_file()["services"]
    for name, service in services.items():
        if service.get("image") == "embed-fleet:latest":
            first = (service.get("entrypoint") or service["command"])[0]
            assert first in programs, f"{name} starts {first}, which the image lacks"
    for _, doc in k8s_documents():
        if doc["kind"] == "Deployment":
            first = doc["spec"]["template"]["spec"]["containers"][0]["command"][0]
            assert first in programs, doc["metadata"]["name"]


def sentinel_overlay() -> list[dict]:
    """``deploy/k8s-sentinel`` as Kubernetes gets it: rendered by kubectl's kustomize."""
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "deploy" / "k8s-sentinel")],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def test_the_sentinel_overlay_is_valid_and_runs_redis_with_sentinels() -> None:
    docs = sentinel_overlay()
    for doc in docs:
        validate_k8s(doc)
        assert doc["kind"] != "Secret"
        assert doc["metadata"].get("namespace") in ("embed-fleet", None), doc["metadata"]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "embed-fleet", doc["metadata"]["name"]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    redis = by_name[("StatefulSet", "redis")]
    assert redis["spec"]["replicas"] == 3
    pod = redis["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"redis", "sentinel"}
    assert containers["redis"]["command"] == ["sh", "/scripts/redis.sh"]
    assert not containers["redis"].get("args")  # the base's one-Redis args are gone
    for container in containers.values():
        env = {e["name"]: e for e in container.get("env", [])}
        assert "secretKeyRef" in env["REDIS_PASSWORD"]["valueFrom"]
    service = by_name[("Service", "redis")]["spec"]
    assert service["clusterIP"] == "None"  # redis-0.redis, ... resolve
    assert {p["port"] for p in service["ports"]} == {6379, 26379}
    scripts = by_name[("ConfigMap", "redis-sentinel-scripts")]["data"]
    for name, script in scripts.items():  # each parses as the shell that runs it
        checked = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
        assert checked.returncode == 0, (name, checked.stderr)
    # The fleet's REDIS_URL the overlay documents names the master its Sentinels watch.
    documented = (REPO / "deploy" / "k8s-sentinel" / "kustomization.yaml").read_text()
    url = next(
        line.split("#", 1)[1].strip() for line in documented.splitlines() if "sentinel://" in line
    )
    target = parse_sentinel(url)
    assert "sentinel monitor fleet " in scripts["sentinel.sh"]
    assert target.master == "fleet" and len(target.sentinels) == 3
    assert {h for h, _ in target.sentinels} == {f"redis-{i}.redis" for i in range(3)}
    # The rest of the fleet is the base's, unchanged.
    base = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_documents()}
    assert base | {("ConfigMap", "redis-sentinel-scripts")} == set(by_name)

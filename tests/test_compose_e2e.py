"""The compose file's services, run as local processes: each service's own `command`
and `environment`, interpolated as compose does, with the service hostnames (`redis`,
`s3`) mapped to this test's Redis and SeaweedFS on loopback and each published port to
a free one. A job runs through them from the `producer` service's entrypoint, Flower
answers behind its basic auth, the queue exporter serves metrics, and every worker
stops on SIGTERM within its `stop_grace_period`. So the commands and variables users
deploy are the ones that work. (No container engine runs here: the images, volumes and
GPU reservations are checked only by the schema, in test_deploy.)"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import CRANFIELD, REPO
from deployment import compose_file, host_env, interpolate, parse_duration_s
from servers import free_port

from shared.control.leases import list_leases

pytestmark = pytest.mark.e2e

OUR_IMAGE = "embed-fleet:latest"
FLOWER_PASSWORD = "compose-test-password"  # noqa: S105 (a throwaway for this test)


class Service:
    """One compose service as a local process."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.argv, self.env = name, argv, env
        self.log_path = log
        self.ports: dict[int, int] = {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                start_new_session=True,
            )

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-15:])


def local_argv(words: list[str]) -> list[str]:
    """The image's executables, from this environment."""
    program = {"celery": [sys.executable, "-m", "celery"]}
    program["embed-collections"] = [sys.executable, "-m", "producer.cli"]
    return program.get(words[0], [words[0]]) + words[1:]


def as_process(
    name: str, service: dict[str, Any], shell: dict[str, str], hosts: dict[str, str], tmp: Path
) -> Service:
    env = {key: interpolate(str(value), shell) for key, value in service["environment"].items()}
    for key, value in env.items():
        for host, local in hosts.items():
            value = value.replace(host, local)
        env[key] = value.replace("/models", str(tmp / "models"))  # the `models` volume
    words = [interpolate(word, shell) for word in service.get("entrypoint", [])]
    words += [interpolate(word, shell) for word in service.get("command", [])]
    ports: dict[int, int] = {}
    for published in service.get("ports", []):
        inside = int(str(published).rsplit(":", 1)[-1])
        ports[inside] = free_port()
        words = [
            w.replace(str(inside), str(ports[inside]))
            if w == str(inside) or w.endswith(f"={inside}")
            else w
            for w in words
        ]
    run_env = host_env(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **env)
    process = Service(name, local_argv(words), run_env, tmp / f"{name}.log")
    process.ports = ports
    return process


def http(url: str, auth: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)  # noqa: S310 (http on loopback)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


def wait_until(check, seconds: float, what: str, services: list[Service]) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            result = check()
            if result:
                return result
        time.sleep(0.5)
    logs = "\n".join(f"--- {s.name}\n{s.tail()}" for s in services)
    pytest.fail(f"{what} within {seconds:.0f} s\n{logs}")


def test_the_compose_services_run_a_job_as_local_processes(
    redis_server, s3, bucket, tmp_path
) -> None:
    redis_server.client().flushdb()
    compose = compose_file()
    services = compose["services"]
    # Redis and the S3 store are stock images: this test's own servers stand in.
    assert services["redis"]["image"].startswith("redis:")
    assert "--appendonly" in services["redis"]["command"]
    assert services["s3"]["image"].startswith("chrislusf/seaweedfs")
    shell = {
        "AWS_ACCESS_KEY_ID": s3.env["AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": s3.env["AWS_SECRET_ACCESS_KEY"],
        "FLOWER_PASSWORD": FLOWER_PASSWORD,
    }
    hosts = {
        "redis:6379": f"127.0.0.1:{redis_server.port}",
        "s3:8333": s3.endpoint.removeprefix("http://"),
    }
    ours = {
        name: as_process(name, service, shell, hosts, tmp_path)
        for name, service in services.items()
        if service.get("image") == OUR_IMAGE
    }
    assert set(ours) == {
        "dense-worker",
        "sparse-worker",
        "aggregate-worker",
        "queue-exporter",
        "flower",
        "producer",
    }
    # The GPU compose reserves, stood in for (this machine has none): the worker leases
    # it and runs on the CPU, and must give it back when stopped.
    ours["dense-worker"].env.update(EMBED_FLEET_GPUS="GPU-compose", EMBED_FLEET_DEVICE="cpu")
    producer = ours.pop("producer")
    running = list(ours.values())
    try:
        for service in running:
            service.start()
        flower, exporter = ours["flower"], ours["queue-exporter"]
        flower_url = f"http://127.0.0.1:{flower.ports[5555]}"
        exporter_url = f"http://127.0.0.1:{exporter.ports[9808]}"
        auth = f"admin:{FLOWER_PASSWORD}"

        def three_workers() -> bool:
            status, body = http(f"{flower_url}/api/workers?refresh=1", auth)
            return status == 200 and len(json.loads(body)) >= 3

        wait_until(three_workers, 120, "Flower saw the three workers", running)
        assert http(f"{flower_url}/api/workers")[0] == 401  # no password, no entry
        assert http(f"{flower_url}/api/workers", "admin:wrong")[0] == 401

        lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:40]
        (tmp_path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
        args = ["run", str(tmp_path / "corpus.jsonl"), "--output", f"s3://{bucket}", "--json"]
        job = subprocess.run(
            producer.argv + args,
            env=producer.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert job.returncode == 0, job.stderr + "\n".join(s.tail() for s in running)
        summary = [json.loads(x) for x in job.stdout.splitlines() if x.startswith("{")][-1]
        assert summary["manifest"]["status"] == "complete"
        assert summary["manifest"]["stages"]["dense"]["items"] > 0

        status, metrics = http(f"{exporter_url}/metrics")
        assert status == 200 and 'embed_fleet_queue_backlog{queue="dense"}' in metrics
        queues = json.loads(http(f"{exporter_url}/queues")[1])["queues"]
        assert queues["dense"]["workers"] and queues["aggregate"]["workers"]
        for service in running:
            assert service.proc.poll() is None, f"{service.name} exited\n{service.tail()}"
        held = list_leases(redis_server.client())
        assert [(lease.uuid, lease.worker.split("@")[0]) for lease in held] == [
            ("GPU-compose", "dense")
        ]
    finally:
        stopped: dict[str, float] = {}
        for service in running:
            if service.proc and service.proc.poll() is None:
                os.kill(service.proc.pid, signal.SIGTERM)
        for service in running:
            if service.proc is None:
                continue
            grace = parse_duration_s(services[service.name].get("stop_grace_period", "10s"))
            started = time.monotonic()
            try:
                service.proc.wait(timeout=grace)
                stopped[service.name] = time.monotonic() - started
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.proc.pid, signal.SIGKILL)
    assert set(stopped) == {s.name for s in running}, "a service outlived its grace period"
    assert list_leases(redis_server.client()) == []

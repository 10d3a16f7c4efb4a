"""Fixtures: real Redis, real SeaweedFS S3, real Celery worker processes, the real model.

Servers are private to the test session (their own loopback ports), started here and
stopped at the end, so tests can kill and restart them without touching anything else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from servers import RedisServer, SeaweedS3, Worker

REPO = Path(__file__).resolve().parents[1]
CRANFIELD = REPO / "examples" / "cranfield"
# `--dtype auto`'s speed verdicts of this test session, in a file of its own: a test's
# small job must not decide the dtype of a later real job on this machine.
SPEED_VERDICTS = Path(tempfile.gettempdir()) / f"embed-fleet-tests-{os.getpid()}" / "verdicts.json"


@pytest.fixture(scope="session", autouse=True)
def speed_verdicts() -> Iterator[Path]:
    """Workers get ``EMBED_FLEET_SPEED_VERDICTS`` (``base_env``); models loaded in this
    process get the same file."""
    from workers.inference import precision

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            precision.SpeedVerdicts, "default", classmethod(lambda cls: cls(SPEED_VERDICTS))
        )
        yield SPEED_VERDICTS
    shutil.rmtree(SPEED_VERDICTS.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def reuse_jobs(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The jobs of a corpus that changed a little (``tests/reuse_jobs.py``), shared by
    the reuse and the delta tests."""
    from reuse_jobs import build

    return build(tmp_path_factory.mktemp("reuse"))


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[object]:
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(s3: SeaweedS3) -> str:
    """A fresh bucket per test."""
    name = f"fleet-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
    return name


@pytest.fixture
def s3_env(s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """S3 credentials and endpoint in this process's environment (for S3Store)."""
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return s3.env


def base_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        # COLUMNS aside: with no terminal, output takes its natural width unless it is set.
        if not k.startswith(("REDIS_URL", "CELERY_", "EMBED_FLEET_", "S3_", "AWS_", "COLUMNS"))
    }
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    env["EMBED_FLEET_SPEED_VERDICTS"] = str(SPEED_VERDICTS)
    env.update(extra)
    return env


@pytest.fixture
def fleet_env(redis_server: RedisServer, s3: SeaweedS3) -> dict[str, str]:
    """Environment of the CLI and workers of a shared fleet: the private Redis, the S3
    server, and a short visibility timeout so redelivery after kill -9 takes seconds."""
    redis_server.client().flushdb()
    return base_env(
        REDIS_URL=redis_server.url,
        EMBED_FLEET_VISIBILITY_TIMEOUT="8",
        EMBED_FLEET_UNACKED_RESTORE_INTERVAL="1",
        EMBED_FLEET_MAX_RETRIES="1",
        **s3.env,
    )


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(queue: str, env: dict[str, str], hostname: str | None = None) -> Worker:
        worker = Worker(queue, env, tmp_path / f"worker-{queue}-{len(started)}.log", hostname)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``embed-collections ARGS`` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "producer.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
    )


def start_cli(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """``embed-collections ARGS`` in the background (``communicate()`` for its output)."""
    return subprocess.Popen(
        [sys.executable, "-m", "producer.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )

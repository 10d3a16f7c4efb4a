"""A job entirely over TLS: Redis on its TLS port only (the plain one closed), clients
shown a certificate of a private CA and showing their own (mutual TLS), with a password;
S3 over HTTPS with that CA in ``AWS_CA_BUNDLE``. The broker, the ledger and the backlog
exporter all go through ``rediss://``; no password, secret or key material reaches a log,
the CLI's output or an artifact."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CRANFIELD, REPO, base_env, run_cli
from servers import S3_SECRET, RedisServer, SeaweedS3, TlsFiles, Worker, free_port, wait_for

pytestmark = pytest.mark.e2e

PASSWORD = "tls-test-password-7f3a"  # noqa: S105 (a test's own)


@pytest.fixture(scope="module")
def tls_servers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RedisServer, SeaweedS3]]:
    folder = tmp_path_factory.mktemp("tls")
    tls = TlsFiles.make(folder / "certs")
    redis_server = RedisServer(folder, tls, PASSWORD)
    s3 = SeaweedS3(folder / "s3", tls)
    (folder / "s3").mkdir()
    redis_server.start()
    s3.start()
    yield redis_server, s3
    s3.stop()
    redis_server.stop()


def test_a_job_runs_entirely_over_tls(tls_servers, tmp_path: Path) -> None:
    redis_server, s3 = tls_servers
    tls = redis_server.tls
    assert tls is not None
    bucket = "tls-bucket"
    s3.client().create_bucket(Bucket=bucket)
    env = base_env(REDIS_URL=redis_server.url, **s3.env)
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines(keepends=True)
    source = tmp_path / "corpus.jsonl"
    source.write_text("".join(lines[:24]))
    worker = Worker("prepare,aggregate,dense", env, tmp_path / "worker.log")
    try:
        result = run_cli(
            "run", str(source), "--output", f"s3://{bucket}", "--format", "jsonl", "--json",
            env=env, cwd=tmp_path, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        summary = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")][-1]
        manifest = summary["manifest"]
        assert manifest["status"] == "complete" and manifest["counts"]["documents"] == 24
        queues = run_cli("queues", "--json", env=env, cwd=tmp_path, timeout=120)
        assert queues.returncode == 0, queues.stderr
        assert "dense" in json.loads(queues.stdout)["queues"]
        # The exporter an autoscaler reads, served from its own process over TLS to Redis.
        port = free_port()
        exporter = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "queues", "--serve", f"127.0.0.1:{port}"],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            wait_for(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 60, "exporter")
            metrics = urllib.request.urlopen(url, timeout=5).read().decode()
            assert 'queue="dense"' in metrics
        finally:
            exporter.terminate()
            exporter_out = exporter.communicate(timeout=30)[0].decode()
    finally:
        worker.stop()
    # Nothing secret anywhere a user or a log shipper reads.
    s3c = s3.client()
    prefix = f"{manifest['collection']}/{manifest['job_id']}/"
    listed = s3c.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
    artifacts = b"".join(s3c.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed)
    key_body = "".join(tls.client_key.read_text().splitlines()[1:3])
    texts = {
        "cli": result.stdout + result.stderr + queues.stdout + queues.stderr,
        "exporter": exporter_out,
        "worker log": (tmp_path / "worker.log").read_text(errors="replace"),
        "artifacts": artifacts.decode(errors="replace"),
    }
    for where, text in texts.items():
        for secret in (PASSWORD, S3_SECRET, key_body, "PRIVATE KEY"):
            assert secret not in text, (where, secret[:12])


def test_a_redis_whose_ca_is_not_given_says_how_to_give_it(tls_servers) -> None:
    redis_server, _ = tls_servers
    without_ca = redis_server.url.replace(f"&ssl_ca_certs={redis_server.tls.ca}", "")
    result = run_cli("queues", env=base_env(REDIS_URL=without_ca), timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "refused the TLS handshake" in errors[0], result.stderr
    assert "ssl_ca_certs=/path/ca.pem" in errors[0] and PASSWORD not in result.stderr
    assert "Traceback" not in result.stderr

"""Bad input and unreachable services: one line that says what to do, a non-zero exit
code, no traceback, and nothing enqueued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import base_env, run_cli
from servers import free_port


def one_line_error(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


GOOD = b'{"id": "a", "text": "alpha"}'


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b'{"id": "b", "text": "unterminated}', "malformed JSON"),
        (b'{"text": "no id"}', "missing required field 'id'"),
        (b'{"id": "c"}', "missing required field 'text'"),
        (b'{"id": "d", "text": "caf\xe9"}', "invalid UTF-8"),
        (b'{"id": "a", "text": "again"}', "duplicate id 'a' (first seen at line 1)"),
    ],
)
def test_bad_record_names_file_line_and_reason(tmp_path, redis_server, bad, reason) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", [GOOD, b'{"id": "z", "text": "zeta"}', bad])
    env = base_env(REDIS_URL=redis_server.url)
    redis_server.client().flushdb()
    line = one_line_error(run_cli("run", str(source), "--output", str(tmp_path / "out"), env=env))
    assert f"{source}:3:" in line
    assert reason in line
    assert "--on-bad-record skip" in line
    # Validation happens before anything is enqueued: no job, no queue, no output.
    assert redis_server.client().keys("*") == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.msgpack"))


def test_missing_source(tmp_path) -> None:
    line = one_line_error(run_cli("run", str(tmp_path / "nope"), env=base_env(), cwd=tmp_path))
    assert "does not exist" in line and "BEIR folder" in line


def test_unreachable_redis(tmp_path) -> None:
    env = base_env(REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    source = write_jsonl(tmp_path / "docs.jsonl", [GOOD])
    line = one_line_error(run_cli("run", str(source), env=env))
    assert "cannot reach Redis" in line and "REDIS_URL" in line
    assert "hunter2" not in line  # credentials are never printed


def test_unreachable_s3(tmp_path, redis_server) -> None:
    env = base_env(
        REDIS_URL=redis_server.url,
        S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
        AWS_ACCESS_KEY_ID="k",
        AWS_SECRET_ACCESS_KEY="s",  # noqa: S106
        AWS_DEFAULT_REGION="us-east-1",
    )
    source = write_jsonl(tmp_path / "docs.jsonl", [GOOD])
    line = one_line_error(run_cli("run", str(source), "--output", "s3://some-bucket/x", env=env))
    assert "cannot reach S3 endpoint" in line and "S3_ENDPOINT_URL" in line


def test_unknown_model_fails_before_enqueueing(tmp_path, redis_server) -> None:
    redis_server.client().flushdb()
    source = write_jsonl(tmp_path / "docs.jsonl", [GOOD])
    env = base_env(REDIS_URL=redis_server.url)
    line = one_line_error(
        run_cli("run", str(source), "--dense-models", "no-such-org/no-such-model", env=env)
    )
    assert "no-such-org/no-such-model" in line and "hf download" in line
    assert redis_server.client().keys("*") == []


def test_detach_without_broker_is_refused(tmp_path) -> None:
    source = write_jsonl(tmp_path / "docs.jsonl", [GOOD])
    line = one_line_error(run_cli("run", str(source), "--detach", env=base_env(), cwd=tmp_path))
    assert "REDIS_URL" in line


def test_skip_mode_counts_and_lists_skipped_records(tmp_path) -> None:
    source = write_jsonl(
        tmp_path / "docs.jsonl",
        [
            GOOD,
            b"not json",
            b'{"id": "e", "text": ""}',
            b'{"id": "a", "text": "dup"}',
            b'{"id": "f", "text": "phi"}',
        ],
    )
    result = run_cli(
        "run", str(source), "--on-bad-record", "skip", "--json", env=base_env(), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    summary = [json.loads(x) for x in result.stdout.splitlines() if '"summary"' in x][-1]
    manifest = summary["manifest"]
    assert manifest["counts"]["skipped_records"] == 2
    assert [(r["line"], r["reason"][:9]) for r in manifest["skipped_records"]] == [
        (2, "malformed"),
        (4, "duplicate"),
    ]
    assert manifest["empty_documents"] == ["e"]
    assert manifest["counts"]["documents"] == 3 and manifest["counts"]["chunks"] == 2

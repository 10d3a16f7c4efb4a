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
    # The producer validates (the fleet's own check is tested in test_prepare_e2e).
    args = ("run", str(source), "--output", str(tmp_path / "out"), "--prepare-on", "producer")
    line = one_line_error(run_cli(*args, env=env))
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


@pytest.mark.parametrize("password", ["wrong-one", ""])
def test_refused_redis_credentials_say_so(tmp_path, password: str) -> None:
    """A Redis that wants a password: a wrong one, or none, is not 'cannot reach'."""
    import subprocess

    from servers import wait_for

    from producer.local_fleet import redis_server_binary

    port = free_port()
    server = subprocess.Popen(
        [redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--requirepass", "the-right-one", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        import redis

        right = redis.Redis(port=port, password="the-right-one")  # noqa: S106
        wait_for(right.ping, 10, "redis-server")
        env = base_env(REDIS_URL=f"redis://:{password}@127.0.0.1:{port}/0")
        line = one_line_error(run_cli("status", env=env, cwd=tmp_path))
        assert ("refused the credentials" if password else "wants credentials") in line
        assert "password in REDIS_URL" in line and "cannot reach" not in line
        assert not password or password not in line  # credentials are never printed
    finally:
        server.kill()
        server.wait()


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


def beir_folder(tmp_path: Path, queries: list[bytes], qrels: str | None = None) -> Path:
    folder = tmp_path / "beir"
    folder.mkdir()
    write_jsonl(folder / "corpus.jsonl", [b'{"_id": "d1", "text": "wing flutter"}'])
    write_jsonl(folder / "queries.jsonl", queries)
    if qrels is not None:
        (folder / "qrels").mkdir()
        (folder / "qrels" / "test.tsv").write_text(qrels)
    return folder


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b'{"_id": "q2", "text": "   "}', "query 'q2' has no text"),
        (b'{"_id": "q1", "text": "again"}', "duplicate id 'q1'"),
        (b'{"_id": "q3"', "malformed JSON"),
    ],
)
def test_bad_query_names_file_and_line(tmp_path, redis_server, bad, reason) -> None:
    folder = beir_folder(tmp_path, [b'{"_id": "q1", "text": "flutter"}', bad])
    redis_server.client().flushdb()
    env = base_env(REDIS_URL=redis_server.url)
    line = one_line_error(run_cli("run", str(folder), "--output", str(tmp_path / "o"), env=env))
    assert f"{folder / 'queries.jsonl'}:2:" in line and reason in line
    assert "--no-queries" in line
    assert redis_server.client().keys("*") == []


def test_bad_qrels_row_names_file_and_line(tmp_path) -> None:
    qrels = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td1\n"
    folder = beir_folder(tmp_path, [b'{"_id": "q1", "text": "flutter"}'], qrels)
    line = one_line_error(run_cli("run", str(folder), env=base_env(), cwd=tmp_path))
    assert f"{folder / 'qrels' / 'test.tsv'}:3: 2 columns" in line


def test_rerank_model_not_staged_fails_before_enqueueing(tmp_path, redis_server) -> None:
    folder = beir_folder(tmp_path, [b'{"_id": "q1", "text": "flutter"}'])
    redis_server.client().flushdb()
    env = base_env(REDIS_URL=redis_server.url, HF_HOME=str(tmp_path / "empty-cache"))
    line = one_line_error(run_cli("run", str(folder), "--enable-rerank", env=env, cwd=tmp_path))
    assert "cross-encoder/ms-marco-MiniLM-L6-v2" in line
    assert "hf download cross-encoder/ms-marco-MiniLM-L6-v2" in line
    assert redis_server.client().keys("*") == []


def test_rerank_without_queries(tmp_path) -> None:
    folder = beir_folder(tmp_path, [b'{"_id": "q1", "text": "flutter"}'])
    result = run_cli("run", str(folder), "--no-queries", "--enable-rerank", env=base_env())
    assert "--enable-rerank needs queries" in one_line_error(result)


def test_fusion_weights_must_name_every_ranking(tmp_path) -> None:
    folder = beir_folder(tmp_path, [b'{"_id": "q1", "text": "flutter"}'])
    result = run_cli(
        "run", str(folder), "--enable-sparse", "--fusion-weights", "dense=1", env=base_env()
    )
    line = one_line_error(result)
    assert "--fusion-weights leaves out splade-tiny, bm25" in line


def test_resume_needs_a_known_job(tmp_path, redis_server) -> None:
    """Neither the ledger nor the output store has the job: the error says where it
    looked and to pass the job's --output."""
    job = "20260101-000000-abcdef"
    alone = run_cli("resume", job, "--output", str(tmp_path), env=base_env(), cwd=tmp_path)
    unknown = run_cli("resume", job, env=base_env(REDIS_URL=redis_server.url), cwd=tmp_path)
    for result in (alone, unknown):
        assert result.returncode == 2, result.stderr
        assert f"no job '{job}'" in result.stderr and "--output" in result.stderr
        assert "Traceback" not in result.stderr
    assert str(tmp_path) in " ".join(alone.stderr.split())


@pytest.mark.parametrize("content", [b"", b"\n \n"], ids=["empty", "blank-lines"])
def test_an_empty_collection_is_an_error_unless_allowed(tmp_path, redis_server, content) -> None:
    source = tmp_path / "corpus.jsonl"
    source.write_bytes(content)
    redis_server.client().flushdb()
    env = base_env(REDIS_URL=redis_server.url)
    out = str(tmp_path / "out")
    line = one_line_error(run_cli("run", str(source), "--output", out, env=env))
    assert f"{source} holds no documents" in line and "--allow-empty" in line
    assert redis_server.client().keys("*") == []  # nothing enqueued
    allowed = run_cli("run", str(source), "--output", out, "--allow-empty", "--detach", env=env)
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip()  # the job id


@pytest.mark.parametrize("prepare_on", ["producer", "fleet"])
def test_a_collection_of_only_bad_records_is_an_error_under_skip(tmp_path, prepare_on) -> None:
    """The producer finds it before enqueueing; the fleet once every range is validated
    (the job fails on bad input, exit 2, and leaves nothing). --allow-empty runs it."""
    source = write_jsonl(tmp_path / "docs.jsonl", [b"{broken", b'{"text": "no id"}'])
    out = tmp_path / "out"
    args = ("run", str(source), "--on-bad-record", "skip", "--prepare-on", prepare_on)
    line = one_line_error(run_cli(*args, "--output", str(out), env=base_env(), cwd=tmp_path))
    assert "holds no valid documents: all 2 records were skipped" in line
    assert f"{source}:1: malformed JSON" in line and "--allow-empty" in line
    assert [p for p in out.rglob("*") if p.is_file()] == []
    allowed = run_cli(*args, "--output", str(out), "--allow-empty", env=base_env(), cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr


def test_a_source_of_another_format_lists_the_accepted_ones(tmp_path) -> None:
    source = tmp_path / "corpus.xlsx"
    source.write_bytes(b"PK\x03\x04")
    line = one_line_error(run_cli("run", str(source), env=base_env(), cwd=tmp_path))
    assert "is not a format embed-collections reads (its name ends in '.xlsx')" in line
    for accepted in ("BEIR folder", ".jsonl.gz", "CSV/TSV", "Parquet", ".txt/.md"):
        assert accepted in line


def test_a_csv_without_the_mapped_column_names_its_columns(tmp_path) -> None:
    source = tmp_path / "papers.csv"
    source.write_text("doc_id,abstract\na,alpha\n")
    args = ("run", str(source), "--id-field", "doc_id")
    line = one_line_error(run_cli(*args, env=base_env(), cwd=tmp_path))
    assert f"{source} has no column 'text' (its columns: doc_id, abstract)" in line
    assert "--text-field NAME" in line


def test_a_compressed_file_cut_short_is_one_line_naming_where(tmp_path) -> None:
    import gzip

    lines = b"".join(b'{"id": "%d", "text": "%s"}\n' % (i, b"y" * 300) for i in range(3000))
    packed = gzip.compress(lines)
    source = tmp_path / "docs.jsonl.gz"
    source.write_bytes(packed[: len(packed) // 2])  # an interrupted download
    args = ("run", str(source), "--prepare-on", "producer")
    line = one_line_error(run_cli(*args, env=base_env(), cwd=tmp_path))
    assert f"{source}:" in line and "cannot be read on" in line and "complete copy" in line


def test_reuse_names_a_finished_job_of_a_fleet_prepared_run(tmp_path) -> None:
    """--reuse of a job that is not there, or with --prepare-on producer: one line each,
    before anything is staged."""
    source = write_jsonl(tmp_path / "corpus.jsonl", [GOOD])
    out = str(tmp_path / "out")
    missing = run_cli(
        "run", str(source), "--output", out, "--reuse", "20260101-000000-abcdef", env=base_env()
    )
    assert "no finished job '20260101-000000-abcdef'" in one_line_error(missing)
    folder = run_cli("run", str(source), "--output", out, "--reuse", "/nowhere", env=base_env())
    assert "'/nowhere' is not a job's folder" in one_line_error(folder)
    producer = run_cli(
        "run", str(source), "--output", out, "--prepare-on", "producer", "--reuse", "x",
        env=base_env(),
    )  # fmt: skip
    assert "--reuse needs --prepare-on fleet" in one_line_error(producer)
    assert not any((tmp_path / "out").rglob("*.msgpack"))

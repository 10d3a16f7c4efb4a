"""Collections in S3 (a real SeaweedFS server) read as the same files on disk are:
every format, the same records with the same lines, the same read ranges, each range
read by ranged GETs; queries found beside a BEIR corpus; clear errors for a missing
object or bucket, refused credentials and an unreachable endpoint; an object replaced
mid-read is an error, not a mix of two versions."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import CRANFIELD
from servers import SeaweedS3

from shared.inputs import locations
from shared.inputs.compressed import PEEK_BYTES
from shared.inputs.locations import READ_BYTES, S3Path, canonical, locate
from shared.inputs.sources import cut_ranges, is_empty, open_source, read_range, read_records
from shared.records.errors import EmbedFleetError, UnreadableFileError
from shared.records.schemas import Document, FieldMap


@pytest.fixture(autouse=True)
def fresh_clients() -> Iterator[None]:
    """Each test makes its own clients (some change the credentials or endpoint)."""
    locations._bucket.cache_clear()
    yield
    locations._bucket.cache_clear()


def upload(s3: SeaweedS3, bucket: str, local: Path, prefix: str) -> str:
    """A file or folder put under ``prefix``; its s3:// URL."""
    client: Any = s3.client()
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for path in files:
        key = f"{prefix}/{path.name}" if local.is_file() else f"{prefix}/{path.relative_to(local)}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}/{local.name}" if local.is_file() else f"s3://{bucket}/{prefix}"


def records(source: str | Path, fields: FieldMap | None = None) -> list[tuple[Any, ...]]:
    """What a user sees of each record: id, text, title, metadata or why it was skipped,
    the file's name and the line."""
    out: list[tuple[Any, ...]] = []
    for r in read_records(open_source(source, fields)):
        name = Path(r.path).name if r.path else ""
        if isinstance(r, Document):
            out.append((r.id, r.text, r.title, r.metadata, name, r.line))
        else:
            out.append(("skipped", r.reason, name, r.line))
    return out


def cranfield_lines(count: int) -> list[str]:
    return (CRANFIELD / "corpus.jsonl").read_text().splitlines()[:count]


def test_every_format_reads_from_s3_as_from_disk(
    s3_env: dict[str, str], s3: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = cranfield_lines(40)
    lines.insert(7, "not json")
    beir = tmp_path / "beir"
    beir.mkdir()
    (beir / "corpus.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode() + b"\n"))
    plain = tmp_path / "docs.jsonl"
    plain.write_text("".join(json.dumps({"id": i, "text": f"doc {i}"}) + "\n" for i in range(30)))
    table = tmp_path / "passages.tsv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["pid", "passage", "source"])
        writer.writerows([[f"p{i}", f"passage {i}", "web"] for i in range(12)])
    dataset = tmp_path / "dataset"
    (dataset / "data").mkdir(parents=True)
    (dataset / "README.md").write_text("# a dataset card, not a document")
    for number in range(2):
        rows = [{"doc": f"d{number}-{i}", "body": f"row {i}"} for i in range(20)]
        target = dataset / "data" / f"train-{number}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), target, row_group_size=6)
    texts = tmp_path / "notes"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.md").write_text("alpha")
    (texts / "sub" / "b.txt").write_text("beta")
    (texts / "sub" / "c.bin").write_bytes(b"\x00")

    cases: list[tuple[Path, FieldMap | None]] = [
        (beir, None),
        (plain, None),
        (table, FieldMap(id="pid", text="passage", metadata=["source"])),
        (dataset, FieldMap(id="doc", text="body")),
        (texts, None),
    ]
    for local, fields in cases:
        url = upload(s3, bucket, local, f"in/{local.name}" if local.is_dir() else "in")
        from_s3, from_disk = records(url, fields), records(local, fields)
        assert from_s3 == from_disk, local.name
        assert open_source(url, fields).kind == open_source(local, fields).kind
        assert open_source(url, fields).bytes_total == open_source(local, fields).bytes_total
    skipped = records(f"s3://{bucket}/in/beir")[7]
    assert skipped[0] == "skipped" and skipped[1].startswith("malformed JSON")
    assert skipped[2:] == ("corpus.jsonl.gz", 8)  # the object's name and its line
    # Documents of a text folder are named by their key under the prefix, as on disk.
    assert [r[0] for r in records(f"s3://{bucket}/in/notes")] == ["a.md", "sub/b.txt"]
    # The collection's name in output keys is the prefix's last segment.
    assert open_source(f"s3://{bucket}/in/dataset/", cases[3][1]).name == "dataset"
    assert canonical(f"s3://{bucket}/in/dataset/") == f"s3://{bucket}/in/dataset"


def test_s3_read_ranges_are_the_disk_ranges_and_read_alike(
    s3_env: dict[str, str], s3: SeaweedS3, bucket: str, tmp_path: Path
) -> None:
    """A JSONL object cut at line starts by a few small reads, a Parquet dataset by row
    groups; each range read on its own gives its part of the whole, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(cranfield_lines(300)) + "\n")
    url = upload(s3, bucket, path, "ranges")
    disk, remote = open_source(path), open_source(url)
    want = cut_ranges(disk, 20_000)
    got = cut_ranges(remote, 20_000)
    assert len(got) > 5
    assert [(r.start, r.end, r.bytes) for r in got] == [(r.start, r.end, r.bytes) for r in want]
    assert {r.path for r in got} == {url}
    whole = [r.id for r in read_records(remote) if isinstance(r, Document)]
    pieces = [r.id for part in got for r in read_range(remote.kind, part, fields=None)]
    assert pieces == whole and len(whole) == 300

    folder = tmp_path / "pq"
    folder.mkdir()
    rows = [{"id": f"r{i}", "text": "x " * (i % 50 + 1)} for i in range(90)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "a.parquet", row_group_size=10)
    pq_url = upload(s3, bucket, folder, "pq")
    disk_ranges = cut_ranges(open_source(folder), 500)
    s3_ranges = cut_ranges(open_source(pq_url), 500)
    assert [(r.start, r.end) for r in s3_ranges] == [(r.start, r.end) for r in disk_ranges]
    assert len(s3_ranges) > 3
    read = [
        (r.id, r.line)
        for part in s3_ranges
        for r in read_range("parquet", part)
        if isinstance(r, Document)
    ]
    assert read == [(f"r{i}", i + 1) for i in range(90)]


def test_queries_and_qrels_are_found_beside_an_s3_corpus(
    s3_env: dict[str, str], s3: SeaweedS3, bucket: str
) -> None:
    from producer.queries import find_query_files, load_query_set

    url = upload(s3, bucket, CRANFIELD, "cranfield")
    source = open_source(url)
    queries, qrels = find_query_files(source, None, None, no_queries=False)
    assert str(queries) == f"{url}/queries.jsonl" and str(qrels) == f"{url}/qrels/test.tsv"
    assert queries is not None
    loaded = load_query_set(queries, qrels)
    assert len(loaded.queries) == 225 and loaded.qrels is not None and len(loaded.qrels) == 225
    explicit, _ = find_query_files(source, f"{url}/queries.jsonl", None, no_queries=False)
    assert explicit == queries
    with pytest.raises(EmbedFleetError, match=r"--queries file 's3://.*/nope.jsonl' does not"):
        find_query_files(source, f"{url}/nope.jsonl", None, no_queries=False)


def test_missing_objects_buckets_and_refused_credentials_are_named(
    s3_env: dict[str, str], s3: SeaweedS3, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(EmbedFleetError, match=rf"source 's3://{bucket}/no/such' does not exist"):
        open_source(f"s3://{bucket}/no/such")
    with pytest.raises(EmbedFleetError, match=r"bucket 'no-such-bucket-x' does not exist"):
        open_source("s3://no-such-bucket-x/corpus.jsonl")
    with pytest.raises(EmbedFleetError, match=r"no bucket"):
        open_source("s3:///corpus.jsonl")
    with pytest.raises(EmbedFleetError, match=r"unsupported source URL 'gs://b/x'"):
        open_source("gs://b/x")
    empty = upload_bytes(s3, bucket, "empty/corpus.jsonl", b"\n \n")
    assert is_empty(open_source(empty))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    locations._bucket.cache_clear()
    with pytest.raises(EmbedFleetError, match=r"access to bucket .* was denied") as denied:
        open_source(f"s3://{bucket}/x.jsonl")
    assert "wrong" not in str(denied.value)  # a credential is never shown
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    locations._bucket.cache_clear()
    with pytest.raises(EmbedFleetError, match=r"cannot reach S3 endpoint http://127.0.0.1:9"):
        open_source(f"s3://{bucket}/x.jsonl")


def upload_bytes(s3: SeaweedS3, bucket: str, key: str, data: bytes) -> str:
    client: Any = s3.client()
    client.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def test_an_object_replaced_mid_read_is_an_error(
    s3_env: dict[str, str], s3: SeaweedS3, bucket: str
) -> None:
    url = upload_bytes(s3, bucket, "moving.jsonl", b"a" * 100)
    remote = locate(url)
    assert isinstance(remote, S3Path)
    with remote.open_raw() as handle:
        assert handle.read(10) == b"a" * 10
        upload_bytes(s3, bucket, "moving.jsonl", b"b" * 100)
        with pytest.raises(locations.ObjectReplacedError, match=r"was replaced while it was"):
            handle.read(10)
    # A reader names the object and the line it reached; the job stops, exit 2.
    # Four read blocks: the second is fetched ahead before the swap (all of the old
    # version, which is fine); the third, after it, is refused.
    text = b"t " * 50
    lines = b"".join(b'{"id": "%d", "text": "%s"}\n' % (i, text) for i in range(500_000))
    assert len(lines) > 3 * READ_BYTES
    big = upload_bytes(s3, bucket, "big.jsonl", lines)
    reading = read_records(open_source(big))
    assert isinstance(next(reading), Document)
    upload_bytes(s3, bucket, "big.jsonl", lines.replace(b"t", b"u"))
    with pytest.raises(UnreadableFileError, match=r"big.jsonl:\d+: cannot be read on .*replaced"):
        list(reading)
    fresh = locate(url)
    assert isinstance(fresh, S3Path) and fresh.read_bytes() == b"b" * 100
    # A seek and an unbuffered read fetch just the bytes asked for.
    with fresh.open_raw() as handle:
        handle.seek(-5, 2)
        assert handle.read(100) == b"b" * 5 and handle.read(1) == b""


def test_cutting_an_s3_object_into_ranges_reads_little_of_it(
    s3_env: dict[str, str], s3: SeaweedS3, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer opens a JSONL object (its first record) and cuts it at line starts
    with one small GET per range: it never downloads the collection."""
    body = b"".join(b'{"id": "%d", "text": "%s"}\n' % (i, b"w " * 100) for i in range(30_000))
    url = upload_bytes(s3, bucket, "big/corpus.jsonl", body)
    fetched: list[int] = []
    get_range = S3Path.get_range

    def counting(self: S3Path, start: int, length: int) -> bytes:
        data = get_range(self, start, length)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(S3Path, "get_range", counting)
    source = open_source(url)
    assert not is_empty(source)
    ranges = cut_ranges(source, 1 << 20)
    assert len(ranges) >= 5 and ranges[-1].end == len(body)
    assert len(fetched) <= len(ranges) + 3  # a GET per range, and the first record's
    assert sum(fetched) <= len(fetched) * PEEK_BYTES < len(body) // 4, (fetched, len(body))
    # A prepare worker's range: one GET of about its size, nothing ahead of it.
    fetched.clear()
    part = ranges[2]
    assert sum(isinstance(r, Document) for r in read_range(source.kind, part)) > 100
    assert len(fetched) == 1 and part.bytes <= fetched[0] <= part.bytes + PEEK_BYTES

"""Object stores: key safety, a local folder, and S3 against a real SeaweedFS server."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from servers import SeaweedS3

from shared.records.errors import EmbedFleetError
from shared.records.job_store import JobLayout
from shared.records.storage import (
    LocalStore,
    S3Store,
    join_key,
    open_store,
    safe_name,
    transient_s3_error,
)

# --- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["..", "a/../b", "../etc/passwd", "a/..", "a\\b", "..\\..\\windows", "a\x00b", "x/\x00"],
)
def test_join_key_refuses_unsafe_segments(bad: str) -> None:
    with pytest.raises(ValueError):
        join_key(bad)
    with pytest.raises(ValueError):
        join_key("safe", bad)


@pytest.mark.parametrize("empty", ["", "/", ".", "./", "//", "/./"])
def test_join_key_refuses_empty_keys(empty: str) -> None:
    with pytest.raises(ValueError):
        join_key(empty)
    with pytest.raises(ValueError):
        join_key(empty, empty)


def test_join_key_normalises() -> None:
    assert join_key("/etc/passwd") == "etc/passwd"
    assert join_key("a/", "/b//c", "./d") == "a/b/c/d"
    assert join_key("coll", "job", "work", "b.msgpack") == "coll/job/work/b.msgpack"
    # Dots inside a name are fine; only whole ".." segments climb.
    assert join_key("a..b", "...", ".hidden") == "a..b/.../.hidden"


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "../../etc",
        "/abs/path",
        "a\\b\\c",
        "a\x00b",
        "",
        "   ",
        "...",
        "-",
        "x/../y",
        "ünïcödé",
    ],
)
def test_safe_name_is_one_safe_segment(name: str) -> None:
    cleaned = safe_name(name)
    assert cleaned
    assert join_key(cleaned) == cleaned  # one segment, accepted by join_key
    assert "/" not in cleaned and "\\" not in cleaned and "\x00" not in cleaned
    assert cleaned not in (".", "..")
    assert not cleaned.startswith((".", "-"))
    assert len(cleaned) <= 128


def test_safe_name_keeps_ordinary_names() -> None:
    for name in ("scifact", "trec-covid", "my_corpus.v2", "A1"):
        assert safe_name(name) == name
    assert safe_name("my corpus (2024)") == "my-corpus-2024"
    assert safe_name("../../etc") == "etc"
    assert len(safe_name("x" * 500)) == 128


def test_job_layout_keys_are_deterministic_and_inside() -> None:
    a = JobLayout("scifact", "job-1")
    b = JobLayout("scifact", "job-1")
    assert a.root == b.root == "scifact/job-1"
    assert a.batch("b000001") == b.batch("b000001") == "scifact/job-1/work/batches/b000001.msgpack"
    assert a.shard("dense", "b000001") == "scifact/job-1/work/dense/b000001.msgpack"
    assert a.batch("b000001") != a.batch("b000002")
    assert a.shard("dense", "b1") != a.shard("sparse", "b1")
    assert a.manifest == "scifact/job-1/manifest.json"
    assert JobLayout("scifact", "job-2").manifest != a.manifest


@pytest.mark.parametrize(
    ("collection", "job_id"),
    [("../../etc", "job"), ("..", ".."), ("/etc", "../x"), ("a\\..\\b", "j\x00k"), ("", "")],
)
def test_job_layout_stays_inside_the_store(tmp_path: Path, collection: str, job_id: str) -> None:
    root = tmp_path / "store"
    store = LocalStore(root)
    layout = JobLayout(collection, job_id)
    for key in (layout.manifest, layout.batch("b1"), layout.shard("dense", "b1")):
        assert ".." not in key.split("/")
        assert len(key.split("/")) >= 3
        assert Path(store.locate(key)).resolve().is_relative_to(root.resolve())
    store.put_bytes(layout.manifest, b"{}")
    assert store.get_bytes(layout.manifest) == b"{}"
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [Path(store.locate(layout.manifest))]
    assert written[0].is_relative_to(root.resolve())


# --- open_store ------------------------------------------------------------------------


def test_open_store_kinds(tmp_path: Path) -> None:
    local = open_store(str(tmp_path / "out"))
    assert isinstance(local, LocalStore)
    assert local.url == str((tmp_path / "out").resolve())
    with pytest.raises(EmbedFleetError) as info:
        open_store("ftp://x")
    assert "ftp://x" in str(info.value)
    with pytest.raises(EmbedFleetError):
        open_store("s3://")


# --- LocalStore ------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_local_put_get_exists_list(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    store.check()
    assert not store.exists("a/b.bin")
    assert list(store.list()) == []
    store.put_bytes("a/b.bin", b"\x00\x01payload")
    store.put_bytes("a/c/d.txt", b"deep")
    store.put_bytes("top.json", b"{}")
    store.put_bytes("ab/e.txt", b"sibling prefix")
    assert store.exists("a/b.bin")
    assert not store.exists("a")  # a folder is not an object
    assert store.get_bytes("a/b.bin") == b"\x00\x01payload"
    assert store.get_bytes("/a/c/d.txt") == b"deep"
    assert list(store.list()) == ["a/b.bin", "a/c/d.txt", "ab/e.txt", "top.json"]
    assert list(store.list("a")) == ["a/b.bin", "a/c/d.txt"]
    assert list(store.list("missing")) == []
    assert list(store.folders()) == ["a", "ab"]
    assert list(store.folders("a")) == ["c"]
    assert list(store.folders("missing")) == []
    # Overwrite replaces the object.
    store.put_bytes("a/b.bin", b"new")
    assert store.get_bytes("a/b.bin") == b"new"
    assert store.locate("a/b.bin") == str(tmp_path / "out" / "a" / "b.bin")
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"x")
    assert not (tmp_path / "escape").exists()


def test_local_put_file(tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    data = os.urandom(300_000)
    source.write_bytes(data)
    store = LocalStore(tmp_path / "out")
    store.put_file("x/y/artifact.bin", source)
    assert store.get_bytes("x/y/artifact.bin") == data
    assert source.read_bytes() == data
    assert list(store.list()) == ["x/y/artifact.bin"]


def test_local_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    store.check()
    source = tmp_path / "src"
    source.write_bytes(b"file")
    for n in range(5):
        store.put_bytes(f"k/{n}", b"x" * n)
        store.put_file(f"f/{n}", source)
    names = [p.name for p in (tmp_path / "out").rglob("*")]
    assert not [n for n in names if n.startswith((".tmp-", ".probe-"))]
    assert sorted(
        p.relative_to(tmp_path / "out").as_posix()
        for p in (tmp_path / "out").rglob("*")
        if p.is_file()
    ) == sorted([f"k/{n}" for n in range(5)] + [f"f/{n}" for n in range(5)])


def test_local_list_hides_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("a/real", b"1")
    (tmp_path / "a" / ".tmp-abc123").write_bytes(b"half written")
    assert list(store.list()) == ["a/real"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_local_file_mode_follows_umask(tmp_path: Path, umask: int) -> None:
    source = tmp_path / "src"
    source.write_bytes(b"data")
    store = LocalStore(tmp_path / "out")
    old = os.umask(umask)
    try:
        store.put_bytes("bytes.bin", b"data")
        store.put_file("file.bin", source)
    finally:
        os.umask(old)
    for key in ("bytes.bin", "file.bin"):
        mode = stat.S_IMODE(Path(store.locate(key)).stat().st_mode)
        assert mode == 0o666 & ~umask, oct(mode)
        assert mode != 0o600
    # The process umask is left as it was.
    current = os.umask(old)
    os.umask(current)
    assert current == old


def test_local_check_fails_for_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    store = LocalStore(blocker / "out")
    with pytest.raises(EmbedFleetError) as info:
        store.check()
    assert str(blocker / "out") in str(info.value)
    assert "--output" in info.value.fix


def test_local_check_creates_the_folder(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "new" / "deeper")
    store.check()
    assert (tmp_path / "new" / "deeper").is_dir()
    assert list((tmp_path / "new" / "deeper").iterdir()) == []


# --- S3Store against SeaweedFS ---------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw_keys(store: S3Store) -> list[str]:
    response = store.client.list_objects_v2(Bucket=store.bucket)
    return sorted(item["Key"] for item in response.get("Contents", []))


def test_s3_put_get_exists_list(s3_env: dict[str, str], bucket: str) -> None:
    store = open_store(f"s3://{bucket}")
    assert isinstance(store, S3Store)
    assert store.prefix == ""
    store.check()
    assert not store.exists("a/b.bin")
    assert list(store.list()) == []
    store.put_bytes("a/b.bin", b"\x00payload")
    store.put_bytes("a/c/d.txt", b"deep")
    store.put_bytes("ab/e.txt", b"sibling prefix")
    store.put_bytes("top.json", b"{}")
    assert store.exists("a/b.bin")
    assert not store.exists("a/b")
    assert store.get_bytes("a/b.bin") == b"\x00payload"
    assert sorted(store.list()) == ["a/b.bin", "a/c/d.txt", "ab/e.txt", "top.json"]
    assert sorted(store.list("a")) == ["a/b.bin", "a/c/d.txt"]
    assert list(store.list("missing")) == []
    assert raw_keys(store) == ["a/b.bin", "a/c/d.txt", "ab/e.txt", "top.json"]
    assert store.locate("a/b.bin") == f"s3://{bucket}/a/b.bin"
    store.put_bytes("a/b.bin", b"replaced")
    assert store.get_bytes("a/b.bin") == b"replaced"
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"x")


def test_s3_with_prefix(s3_env: dict[str, str], bucket: str) -> None:
    store = open_store(f"s3://{bucket}/some/prefix/")
    assert isinstance(store, S3Store)
    assert store.prefix == "some/prefix"
    store.check()
    store.put_bytes("a.txt", b"A")
    store.put_bytes("sub/b.txt", b"B")
    # Another store whose prefix shares the first characters must not leak in.
    sibling = open_store(f"s3://{bucket}/some/prefix2")
    sibling.put_bytes("c.txt", b"C")
    assert raw_keys(store) == ["some/prefix/a.txt", "some/prefix/sub/b.txt", "some/prefix2/c.txt"]
    assert sorted(store.list()) == ["a.txt", "sub/b.txt"]
    assert list(store.list("sub")) == ["sub/b.txt"]
    assert list(sibling.list()) == ["c.txt"]
    assert store.get_bytes("sub/b.txt") == b"B"
    assert store.exists("a.txt")
    assert not store.exists("c.txt")
    assert store.locate("sub/b.txt") == f"s3://{bucket}/some/prefix/sub/b.txt"
    # The whole bucket, seen without a prefix.
    whole = open_store(f"s3://{bucket}")
    assert sorted(whole.list("some/prefix")) == ["some/prefix/a.txt", "some/prefix/sub/b.txt"]
    assert whole.get_bytes("some/prefix/a.txt") == b"A"
    # Folders: one level, under the store's prefix, not its sibling's.
    assert list(store.folders()) == ["sub"]
    assert list(whole.folders("some")) == ["prefix", "prefix2"]
    assert list(whole.folders()) == ["some"]
    assert list(store.folders("sub")) == []


def test_delete_folder_removes_only_that_folder(
    s3_env: dict[str, str], bucket: str, tmp_path: Path
) -> None:
    """A job's work/ goes in DeleteObjects calls of up to 1,000 keys; its siblings stay."""
    for store in (open_store(f"s3://{bucket}/out"), open_store(str(tmp_path / "out"))):
        for i in range(1005):
            store.put_bytes(f"job/work/batches/b{i:05d}.msgpack", b"x")
        store.put_bytes("job/work2/keep.txt", b"k")
        store.put_bytes("job/manifest.json", b"{}")
        assert store.delete_folder("job/work") == 1005
        assert sorted(store.list()) == ["job/manifest.json", "job/work2/keep.txt"]
        assert store.delete_folder("job/work") == 0


def test_s3_put_file_multipart(s3_env: dict[str, str], bucket: str, tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    data = os.urandom(11 * 1024 * 1024)
    path.write_bytes(data)
    store = open_store(f"s3://{bucket}/artifacts")
    assert isinstance(store, S3Store)
    store.put_file("job/vectors.bin", path)
    assert store.exists("job/vectors.bin")
    assert store.get_bytes("job/vectors.bin") == data
    head = store.client.head_object(Bucket=bucket, Key="artifacts/job/vectors.bin")
    assert head["ContentLength"] == len(data)
    # A multipart upload's ETag is "<md5 of part md5s>-<parts>".
    assert "-" in head["ETag"].strip('"'), head["ETag"]


def test_s3_check_missing_bucket(s3_env: dict[str, str]) -> None:
    name = f"missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(EmbedFleetError) as info:
        S3Store(f"s3://{name}/prefix").check()
    assert name in str(info.value)
    assert "does not exist" in str(info.value)
    assert s3_env["S3_ENDPOINT_URL"] in str(info.value)


def test_s3_check_unreachable_endpoint(
    s3_env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("S3_ENDPOINT_URL", endpoint)
    with pytest.raises(EmbedFleetError) as info:
        S3Store(f"s3://{bucket}").check()
    assert endpoint in str(info.value)
    assert "S3_ENDPOINT_URL" in info.value.fix


def test_s3_check_wrong_credentials(
    s3_env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # S3Store builds its client from boto3's process-wide default session, which keeps
    # the first credentials it resolved (see the xfail test below); start a fresh one
    # so this test sees the environment it sets, whatever ran before it.
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    with pytest.raises(EmbedFleetError) as info:
        S3Store(f"s3://{bucket}").check()
    assert bucket in str(info.value)
    assert "denied" in str(info.value)
    assert "AWS_SECRET_ACCESS_KEY" in info.value.fix


def test_s3_store_reads_credentials_when_created(
    s3_env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    S3Store(f"s3://{bucket}").check()  # resolves (and caches) the good credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    with pytest.raises(EmbedFleetError):
        S3Store(f"s3://{bucket}").check()


# --- S3 outages ------------------------------------------------------------------------


def test_s3_errors_that_say_later_are_transient(
    s3_env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real errors from a real server and a real dead endpoint: no connection is
    transient; a missing key or a refused credential is not."""
    from botocore.exceptions import ClientError

    store = open_store(f"s3://{bucket}")
    assert isinstance(store, S3Store)
    with pytest.raises(ClientError) as missing:
        store.get_bytes("nothing/here.bin")
    assert not transient_s3_error(missing.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-" + s3_env["AWS_SECRET_ACCESS_KEY"])
    with pytest.raises(ClientError) as refused:
        open_store(f"s3://{bucket}").put_bytes("x.bin", b"x")
    assert not transient_s3_error(refused.value)
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(Exception) as dead:
        open_store(f"s3://{bucket}").get_bytes("x.bin")
    assert transient_s3_error(dead.value)


def test_s3_calls_give_up_when_the_window_is_spent(
    s3_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    store = open_store("s3://nowhere", transient_window_s=2)
    started = time.monotonic()
    with pytest.raises(Exception) as dead:
        store.put_bytes("x.bin", b"x")
    waited = time.monotonic() - started
    assert transient_s3_error(dead.value)
    assert 1.5 <= waited < 10, waited  # the window, not botocore's 3 quick attempts


def test_s3_calls_ride_out_an_outage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 stops and comes back 3 s later with its data: a store with a transient window
    waits and succeeds; one without fails at once."""
    (tmp_path / "weed").mkdir()
    server = SeaweedS3(tmp_path / "weed")
    server.start()
    restart = threading.Timer(3, server.start)
    try:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        server.client().create_bucket(Bucket="outage")  # type: ignore[attr-defined]
        patient = open_store("s3://outage", transient_window_s=120)
        patient.put_bytes("before.bin", b"1")
        server.stop()
        with pytest.raises(Exception) as down:
            open_store("s3://outage").get_bytes("before.bin")
        assert transient_s3_error(down.value)
        started = time.monotonic()
        restart.start()
        patient.put_bytes("during.bin", b"2")
        assert time.monotonic() - started >= 2.5  # it waited for the restart
        assert patient.get_bytes("before.bin") == b"1"
        assert patient.get_bytes("during.bin") == b"2"
        assert sorted(patient.list()) == ["before.bin", "during.bin"]
    finally:
        restart.cancel()
        restart.join()
        server.stop()


def test_delete_removes_and_is_quiet_when_missing(
    tmp_path: Path, s3_env: dict[str, str], bucket: str
) -> None:
    for store in (LocalStore(tmp_path / "out"), open_store(f"s3://{bucket}/p")):
        store.put_bytes("a/b.bin", b"x")
        store.delete("a/b.bin")
        assert not store.exists("a/b.bin")
        store.delete("a/b.bin")  # already gone: no error

"""Reading a collection from S3 (SeaweedFS on loopback) against reading it from disk and
against bare boto3, in the same run.

Three readers of the same JSONL collection (Cranfield, repeated to ``--mb`` MiB):
- disk: ``read_records`` of the file on disk (the reader every other source uses);
- s3: ``read_records`` of its ``s3://`` URL: ranged GETs of 8 MiB through
  ``shared.inputs.locations.S3Path``;
- bare boto3: one ``get_object`` streamed line by line and each line decoded with
  msgspec into the same record type: the least any S3 reader must do.

Also the producer's look at the object before a job: ``open_source`` and ``cut_ranges``
into 8 MiB ranges (what ``--prepare-on fleet`` does), and how many bytes it fetched;
and Parquet: the same documents as a Parquet file in row groups, from disk and from S3.

Usage: python bench/s3_source.py [--mb 256] [--repeat 3]
Writes bench/results/s3_source.json and prints a table (best of ``--repeat``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(REPO / "tests"))

from servers import SeaweedS3

from shared.inputs import locations
from shared.inputs.sources import cut_ranges, open_source, read_records
from shared.records.schemas import Document
from workers.inference.precision import cpu_flags

BUCKET = "bench-sources"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the JSONL collection")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "s3_source.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "weed").mkdir()
        server = SeaweedS3(work / "weed")
        server.start()
        try:
            os.environ.update(server.env)
            result = run(server, work, args.mb, args.repeat)
        finally:
            server.stop()
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "bf16_flags": sorted({"amx_bf16", "avx512_bf16"} & cpu_flags()),
        "server": "SeaweedFS `weed mini` on loopback, same machine",
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    show(result)
    print(f"wrote {args.out}")


def run(server: SeaweedS3, work: Path, mb: int, repeat: int) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    client: Any = server.client()
    client.create_bucket(Bucket=BUCKET)
    lines = (REPO / "examples" / "cranfield" / "corpus.jsonl").read_bytes().splitlines()
    path = work / "corpus.jsonl"
    with path.open("wb") as handle:
        copy = 0
        while handle.tell() < mb << 20:
            for line in lines:  # unique ids: a repeated collection would be duplicates
                record = json.loads(line)
                record["_id"] = f"{record['_id']}-{copy}"
                handle.write(json.dumps(record).encode() + b"\n")
            copy += 1
    size = path.stat().st_size
    client.upload_file(str(path), BUCKET, "corpus.jsonl")
    url = f"s3://{BUCKET}/corpus.jsonl"
    rows = [json.loads(line) for line in path.read_bytes().splitlines()]
    table = pa.Table.from_pylist([{"id": r["_id"], "text": r["text"]} for r in rows])
    pq_path = work / "corpus.parquet"
    pq.write_table(table, pq_path, row_group_size=20_000)
    client.upload_file(str(pq_path), BUCKET, "corpus.parquet")
    del rows, table

    readers: dict[str, Callable[[], int]] = {
        "jsonl disk": lambda: count(str(path)),
        "jsonl s3": lambda: count(url),
        "jsonl bare boto3": lambda: bare_boto3(client),
        "parquet disk": lambda: count(str(pq_path)),
        "parquet s3": lambda: count(f"s3://{BUCKET}/corpus.parquet"),
    }
    out: dict[str, Any] = {"bytes": size, "parquet_bytes": pq_path.stat().st_size, "readers": {}}
    documents = 0
    for name, reader in readers.items():
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            documents = reader()
            best = min(best, time.perf_counter() - started)
        data = out["parquet_bytes"] if name.startswith("parquet") else size
        out["readers"][name] = {
            "documents": documents,
            "seconds": best,
            "mib_per_s": data / 2**20 / best,
            "docs_per_s": documents / best,
        }
        print(f"{name}: {best:.2f} s", file=sys.stderr)
    out["documents"] = documents
    bare = out["readers"]["jsonl bare boto3"]["seconds"]
    out["s3_vs_bare_boto3"] = out["readers"]["jsonl s3"]["seconds"] / bare
    out["s3_vs_disk"] = (
        out["readers"]["jsonl s3"]["seconds"] / out["readers"]["jsonl disk"]["seconds"]
    )
    out["cut"] = cut_cost(url, size)
    return out


def count(source: str) -> int:
    return sum(isinstance(r, Document) for r in read_records(open_source(source)))


def bare_boto3(client: Any) -> int:
    """One GET, streamed by lines, each decoded into the reader's record type."""
    import msgspec

    from shared.inputs.sources import _BeirRecord

    decoder = msgspec.json.Decoder(_BeirRecord)
    body = client.get_object(Bucket=BUCKET, Key="corpus.jsonl")["Body"]
    documents = 0
    for line in body.iter_lines(chunk_size=1 << 20):
        if line.strip():
            decoder.decode(line)
            documents += 1
    return documents


def cut_cost(url: str, size: int) -> dict[str, Any]:
    """What the producer fetches to open the object and cut it into 8 MiB ranges."""
    fetched: list[int] = []
    get_range = locations.S3Path.get_range

    def counting(self: locations.S3Path, start: int, length: int) -> bytes:
        data = get_range(self, start, length)
        fetched.append(len(data))
        return data

    locations.S3Path.get_range = counting  # type: ignore[method-assign]
    try:
        started = time.perf_counter()
        ranges = cut_ranges(open_source(url), 8 << 20)
        seconds = time.perf_counter() - started
    finally:
        locations.S3Path.get_range = get_range  # type: ignore[method-assign]
    return {
        "ranges": len(ranges),
        "gets": len(fetched),
        "bytes_fetched": sum(fetched),
        "share_of_object": sum(fetched) / size,
        "seconds": seconds,
    }


def show(result: dict[str, Any]) -> None:
    table = Table(
        title=f"reading {result['documents']:,} documents ({result['bytes'] / 2**20:.0f} MiB JSONL)"
    )
    for column in ("reader", "seconds", "MiB/s", "docs/s"):
        table.add_column(column, justify="right" if column != "reader" else "left")
    for name, figures in result["readers"].items():
        table.add_row(
            name,
            f"{figures['seconds']:.2f}",
            f"{figures['mib_per_s']:.0f}",
            f"{figures['docs_per_s']:,.0f}",
        )
    cut = result["cut"]
    table.caption = (
        f"s3 / bare boto3: {result['s3_vs_bare_boto3']:.2f}x the time; s3 / disk: "
        f"{result['s3_vs_disk']:.2f}x. Cutting into {cut['ranges']} ranges of 8 MiB: "
        f"{cut['gets']} GETs, {cut['bytes_fetched'] / 2**10:.0f} KiB "
        f"({100 * cut['share_of_object']:.2f}% of the object), {cut['seconds']:.2f} s"
    )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()

"""Hostile inputs: what one bad record costs a prepare worker, with the input limits and
without them (issue 29's bomb).

The bomb is issue 29's: one 400 MB record of words in a ``.jsonl.gz`` of well under a
megabyte, between two ordinary documents. Each run does what a prepare worker does with
a range of it, in a process of its own: validate (read and parse every record), then
chunk (read again, cut each document with all-MiniLM-L6-v2's tokenizer at 256 tokens).
It reports the wall time and the process's peak resident memory (``ru_maxrss``):

- **limits**: the defaults (``--max-record-bytes 64MiB``, ``--max-document-chunks
  10000``): the record is read past in blocks and named a bad record;
- **no limits**: both limits lifted (a record may hold 1 TiB, a document any number of
  chunks), as every reader was before them: the record is parsed, then chunked whole.

Writes ``bench/results/hostile_inputs.json`` and prints a table.

    python bench/hostile_inputs.py [--record-mb 400] [--timeout 900]
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO

RESULTS = REPO / "bench" / "results" / "hostile_inputs.json"
NO_LIMITS = {"max_record_bytes": 2**40, "max_document_chunks": 2**40}


def write_bomb(path: Path, record_mb: int) -> int:
    """The bomb: an ordinary record, one of ``record_mb`` MiB of words, another. Returns
    the big record's bytes."""
    block = b"lorem ipsum dolor sit amet " * 38_836  # about 1 MiB of words
    head = b'{"id": "bomb", "text": "'
    with gzip.open(path, "wb", compresslevel=6) as out:
        out.write(json.dumps({"id": "a", "text": "an ordinary document"}).encode() + b"\n")
        out.write(head)
        for _ in range(record_mb):
            out.write(block)
        out.write(b'"}\n')
        out.write(json.dumps({"id": "b", "text": "another one"}).encode() + b"\n")
    return len(head) + record_mb * len(block) + 3


def prepare_once(path: str, limits: dict[str, int]) -> dict[str, Any]:
    """Validate, then chunk, the bomb as one range, as a prepare worker does; in this
    process (run by :func:`measure` in a child of its own)."""
    from shared.inputs.chunking import Chunker, ChunkTally, chunk_batches, load_tokenizer
    from shared.inputs.models import DEFAULT_DENSE_MODEL, resolve_model
    from shared.inputs.sources import cut_ranges, open_source, read_range
    from shared.records.schemas import Document, InputLimits, SkippedRecord

    bounds = InputLimits(**limits)
    source = open_source(path)
    part = cut_ranges(source, 2**40)[0]
    tokenizer = load_tokenizer(str(resolve_model(DEFAULT_DENSE_MODEL).path))
    chunker = Chunker(tokenizer, 256, max_document_chunks=bounds.max_document_chunks)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    bad = [
        r.reason
        for r in read_range(source.kind, part, limits=bounds)
        if isinstance(r, SkippedRecord)
    ]
    validated = time.perf_counter() - started
    tally = ChunkTally()
    docs = (r for r in read_range(source.kind, part, limits=bounds) if isinstance(r, Document))
    for _ in chunk_batches(chunker, docs, 128, tally):
        pass
    return {
        "validate_s": round(validated, 2),
        "wall_s": round(time.perf_counter() - started, 2),
        "bad_records": bad + [r.reason for r in tally.too_long],
        "chunks": tally.chunks,
        "baseline_rss_mib": round(baseline / 1024),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def measure(path: Path, limits: dict[str, int], timeout: float) -> dict[str, Any]:
    """:func:`prepare_once` in a child process, so its peak memory is its own."""
    code = (
        "import json, sys; sys.path.insert(0, 'bench'); import hostile_inputs as h; "
        f"print(json.dumps(h.prepare_once({str(path)!r}, {limits!r})))"
    )
    started = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout}
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    found["process_s"] = round(time.perf_counter() - started, 1)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record-mb", type=int, default=400)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument(
        "--only",
        choices=["limits", "no_limits"],
        help="run only this one; the other is kept from the last results file",
    )
    args = parser.parse_args()
    kept = json.loads(RESULTS.read_text()) if args.only and RESULTS.exists() else {}
    from workers.inference.precision import cpu_flags

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bomb.jsonl.gz"
        record = write_bomb(path, args.record_mb)
        result: dict[str, Any] = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_tile"}),
            },
            "bomb": {"record_bytes": record, "file_bytes": path.stat().st_size},
        }
        for name, limits in (("limits", {}), ("no_limits", NO_LIMITS)):
            if args.only in (None, name):
                result[name] = measure(path, limits, args.timeout)
            else:
                result[name] = kept[name]
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    bomb = result["bomb"]
    print(
        f"bomb: one record of {bomb['record_bytes'] / 2**20:,.0f} MiB in a "
        f"{bomb['file_bytes'] / 2**10:,.0f} KiB .jsonl.gz"
    )
    print(f"{'run':<10} {'wall s':>8} {'RSS before':>11} {'peak RSS MiB':>13} {'chunks':>8}  bad")
    for name in ("limits", "no_limits"):
        run = result[name]
        if "timed_out_after_s" in run:
            print(f"{name:<10} {'>' + str(int(run['timed_out_after_s'])):>8}")
            continue
        print(
            f"{name:<10} {run['wall_s']:>8} {run.get('baseline_rss_mib', '-'):>11} "
            f"{run['peak_rss_mib']:>13,} {run['chunks']:>8,}  {len(run['bad_records'])}"
        )


if __name__ == "__main__":
    main()

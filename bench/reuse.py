"""Re-embedding a changed corpus: a job run with ``--reuse`` against the full job before
it and against the same changed corpus embedded from scratch, in the same run.

The corpus: ``--scale`` copies of Cranfield with new ids (``<copy>-<id>``), as JSONL;
every copy after the first, and every added document, carries its copy number every
eight words (:func:`marked`), so that no two copies share a chunk text (the fleet
encodes a text a job holds twice once, and would encode identical copies once).
Each job is ``embed-collections run`` as a user runs it (the embedded fleet), MiniLM +
SPLADE-tiny + BM25 in fp32 (so that recomputed vectors can be held to 1e-5), no
queries, output to one local folder:

1. **full**: the corpus;
2. **reuse**: the corpus with ``--edited`` of its documents edited (a sentence added),
   ``--added`` added (new ids) and ``--removed`` removed, with ``--reuse`` pointing at
   the full job;
3. **clean**: the same changed corpus from scratch.

Per run: wall time, and per model the chunk texts encoded (the manifest's
``counts.encoded``). Then the reuse job's output against the others': the same chunk
ids as the clean job; its reused vectors bit for bit the full job's; its encoded ones
within 1e-5 of the clean job's; and the chunks encoded against the changed and added
chunks (those whose document and text the full job did not have). Then its delta
(``export --to delta``, BM25 left out): bytes and rows against the whole output.

Last, **duplicates**: a corpus of ``--dup-docs`` Cranfield documents where one in ten has
a mirror (the same title and text, another id), the mirrors all at the end, so in other
read ranges and encode units than their originals; dense only: the chunk texts encoded
against the chunks and the distinct texts, and every mirror's vectors against its
original's.

Usage: python bench/reuse.py [--scale 10] [--edited 0.01] [--added 0.005]
       [--removed 0.005] [--dup-docs 1400] [--duplicates-only]
Writes bench/results/reuse.json and prints a table (``--duplicates-only``: runs the
duplicates alone and replaces that section of the file).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from common import REPO, cli_job
from rich.console import Console
from rich.table import Table

from shared.control.settings import Settings
from workers.inference.precision import cpu_flags

CRANFIELD = REPO / "examples" / "cranfield" / "corpus.jsonl"
RESULTS = REPO / "bench" / "results"
DENSE = "sentence-transformers/all-MiniLM-L6-v2"
SPLADE = "splade-tiny"
MODELS = ["--sparse-models", f"{SPLADE},bm25", "--dtype", "fp32", "--no-queries"]
TARGETS = {"reuse_over_full_wall": 0.1, "recomputed_max_abs": 1e-5}
# What this bench measures includes texts a job holds twice, encoded once: the fleet's
# default claims, which bench/common.py turns off for the other benches.
CLAIMS_ON = {"EMBED_FLEET_TEXT_CLAIMS": str(Settings.text_claims)}
OPTIONS: list[tuple[str, int | float, str]] = [
    ("--scale", 10, "copies of Cranfield"),
    ("--edited", 0.01, "share of the documents edited"),
    ("--added", 0.005, "share of the documents added"),
    ("--removed", 0.005, "share of the documents removed"),
    ("--dup-docs", 1400, "documents of the duplicates run"),
]


def cranfield() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CRANFIELD.read_text().splitlines() if line.strip()]


def write(docs: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    return path


def marked(text: str, copy: int | str, every: int = 8) -> str:
    """A copy's text with its copy number every few words (copy 0: the text as it is),
    so that no two copies share a chunk text: a job encodes a text it holds twice once,
    and identical copies would make a 10x corpus cost what one copy costs."""
    if copy == 0:
        return text
    words = text.split()
    for at in range(len(words) - len(words) % every, -1, -every):
        words.insert(at, f"[{copy}]")
    return " ".join(words)


def corpora(
    scale: int, edited: float, added: float, removed: float, folder: Path
) -> tuple[Path, Path, dict[str, int]]:
    """The full corpus and the changed one (seeded: the same change every run)."""
    records = cranfield()
    docs = [
        {"_id": f"{copy}-{r['_id']}", "title": r.get("title", ""), "text": marked(r["text"], copy)}
        for copy in range(scale)
        for r in records
    ]
    pick = random.Random(27)
    order = list(range(len(docs)))
    pick.shuffle(order)
    n_edit, n_remove, n_add = (round(share * len(docs)) for share in (edited, removed, added))
    edit = set(order[:n_edit])
    gone = set(order[n_edit : n_edit + n_remove])
    changed = []
    for index, doc in enumerate(docs):
        if index in gone:
            continue
        if index in edit:
            doc = {**doc, "text": doc["text"] + " This sentence was added in the new version."}
        changed.append(doc)
    changed += [
        {"_id": f"new-{r['_id']}", "title": r.get("title", ""), "text": marked(r["text"], "new")}
        for r in records[:n_add]
    ]
    counts = {"documents": len(docs), "edited": n_edit, "removed": n_remove, "added": n_add}
    return (
        write(docs, folder / "v1" / "corpus.jsonl"),
        write(changed, folder / "v2" / "corpus.jsonl"),
        counts,
    )


def parts(out: Path, manifest: dict[str, Any]) -> pa.Table:
    return pq.read_table([str(out / key) for key in manifest["chunks"]["parts"]])


def dense_matrix(table: pa.Table, column: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    values = table.column(column).combine_chunks()
    flat = np.asarray(values.flatten(), np.float32)
    return flat.reshape(len(table), values.type.list_size)


def compare(
    out: Path, full: dict[str, Any], reuse: dict[str, Any], clean: dict[str, Any]
) -> dict[str, Any]:
    """The reuse job's output against the full job's and the clean job's."""
    tables = {
        name: parts(out, m) for name, m in (("full", full), ("reuse", reuse), ("clean", clean))
    }
    column = next(c for c in tables["reuse"].column_names if c.startswith("dense_"))
    ids = {name: t.column("chunk_id").to_pylist() for name, t in tables.items()}
    same_ids = ids["reuse"] == ids["clean"]
    earlier = {
        (d, k): i
        for i, (d, k) in enumerate(
            zip(
                tables["full"]["doc_id"].to_pylist(),
                tables["full"]["text_key"].to_pylist(),
                strict=True,
            )
        )
    }
    keys = list(
        zip(
            tables["reuse"]["doc_id"].to_pylist(),
            tables["reuse"]["text_key"].to_pylist(),
            strict=True,
        )
    )
    found = np.array([key in earlier for key in keys])
    mine, theirs, clean_m = (dense_matrix(tables[n], column) for n in ("reuse", "full", "clean"))
    rows = [earlier[key] for key in keys if key in earlier]
    bitwise = bool(np.array_equal(mine[found].view(np.uint32), theirs[rows].view(np.uint32)))
    recomputed = float(np.abs(mine[~found] - clean_m[~found]).max()) if (~found).any() else 0.0
    reused_vs_clean = float(np.abs(mine[found] - clean_m[found]).max()) if found.any() else 0.0
    return {
        "chunks": len(keys),
        "changed_or_added_chunks": int((~found).sum()),
        "same_chunk_ids_as_clean": same_ids,
        "reused_bit_identical_to_full": bitwise,
        "recomputed_max_abs_vs_clean": recomputed,
        "reused_max_abs_vs_clean": reused_vs_clean,
    }


def encoded_exactly(changes: dict[str, Any], compared: dict[str, Any]) -> bool:
    """Whether each model encoded exactly the changed and added chunks: each one it
    did not take from the earlier job it encoded, or served from the same text
    elsewhere in its unit (a repeat), and took every chunk the earlier job had."""
    new = compared["changed_or_added_chunks"]
    return all(
        changes["encoded"][model] + changes["repeats"][model] == new
        and changes["reused"][model] == compared["chunks"] - new
        for model in changes["encoded"]
    )


def delta(out: Path, job_id: str, folder: Path) -> dict[str, Any]:
    """``export --to delta`` of the reuse job against the job it reused, BM25 left out."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "producer.cli", "export", job_id, "--to", "delta", str(folder),
         "--output", str(out), "--drop-columns", "sparse_bm25"],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"delta failed:\n{done.stderr[-3000:]}")
    report = json.loads((folder / "delta.json").read_text())
    whole = sum(
        f.stat().st_size
        for f in (out / report["job"].split(str(out))[-1].lstrip("/") / "chunks").glob("*")
    )
    written = sum(f["bytes"] for f in report["files"])
    return {
        "wall_s": round(time.perf_counter() - started, 1),
        "counts": report["counts"],
        "bytes": written,
        "job_chunk_bytes": whole,
        "share_of_job": round(written / whole, 4) if whole else None,
    }


def duplicates(docs: int, folder: Path, out: Path) -> dict[str, Any]:
    """One document in ten mirrored at the corpus's end: texts encoded against chunks."""
    records = cranfield()[:docs]
    mirrors = [{**r, "_id": f"mirror-{r['_id']}"} for i, r in enumerate(records) if i % 10 == 0]
    source = write(records + mirrors, folder / "dup" / "corpus.jsonl")
    manifest = cli_job(source, ["--dtype", "fp32", "--no-queries"], CLAIMS_ON, output=out)
    chunks = manifest["counts"]["chunks_exported"]
    encoded = manifest["counts"]["encoded"][DENSE]
    table = parts(out, manifest)
    texts = table.column("text").to_pylist()
    # Every mirror's chunk against its original's: the same vector, bit for bit.
    vectors = dense_matrix(table, next(c for c in table.column_names if c.startswith("dense_")))
    first: dict[tuple[str, int], int] = {}
    for row, chunk_id in enumerate(table.column("chunk_id").to_pylist()):
        doc_id, index = chunk_id.rsplit("#", 1)
        first.setdefault((doc_id.removeprefix("mirror-"), int(index)), row)
    mirrored_rows = [
        (row, first[(c.rsplit("#", 1)[0].removeprefix("mirror-"), int(c.rsplit("#", 1)[1]))])
        for row, c in enumerate(table.column("chunk_id").to_pylist())
        if c.startswith("mirror-")
    ]
    identical = all(
        vectors[mine].tobytes() == vectors[theirs].tobytes() for mine, theirs in mirrored_rows
    )
    return {
        "documents": len(records) + len(mirrors),
        "mirrors": len(mirrors),
        "placement": "mirrors at the end (other ranges and units than their originals)",
        "chunks": chunks,
        "distinct_texts": len(set(texts)),
        "encoded": encoded,
        "encoded_share": round(encoded / chunks, 4),
        "mirror_chunks": len(mirrored_rows),
        "mirrors_bit_identical": identical,
        "wall_s": manifest["wall_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default, what in OPTIONS:
        parser.add_argument(flag, type=type(default), default=default, help=what)
    parser.add_argument(
        "--duplicates-only",
        action="store_true",
        help="run the duplicates alone and replace that section of bench/results/reuse.json",
    )
    args = parser.parse_args()
    console = Console()
    started = time.time()
    if args.duplicates_only:
        with tempfile.TemporaryDirectory(prefix="embed-fleet-reuse-") as tmp:
            dups = duplicates(args.dup_docs, Path(tmp), Path(tmp) / "dup-out")
        kept = json.loads((RESULTS / "reuse.json").read_text())
        kept["duplicates"] = dups
        (RESULTS / "reuse.json").write_text(json.dumps(kept, indent=2) + "\n")
        report(kept, console)
        return
    with tempfile.TemporaryDirectory(prefix="embed-fleet-reuse-") as tmp:
        folder = Path(tmp)
        out = folder / "out"
        v1, v2, changes = corpora(args.scale, args.edited, args.added, args.removed, folder)
        console.print("full job ...")
        full = cli_job(v1, MODELS, CLAIMS_ON, output=out)
        console.print("reuse job ...")
        reuse = cli_job(v2, [*MODELS, "--reuse", full["job_id"]], CLAIMS_ON, output=out)
        console.print("clean job ...")
        clean = cli_job(v2, MODELS, CLAIMS_ON, output=out)
        compared = compare(out, full, reuse, clean)
        console.print("delta ...")
        exported = delta(out, reuse["job_id"], folder / "delta")
        console.print("duplicates ...")
        dups = duplicates(args.dup_docs, folder, folder / "dup-out")
    runs = {
        name: {
            "job_id": m["job_id"],
            "wall_s": m["wall_s"],
            "chunks": m["counts"]["chunks_exported"],
            "encoded": m["counts"]["encoded"],
            "stages_items_per_s": {s: v["items_per_s"] for s, v in m["stages"].items()},
        }
        for name, m in (("full", full), ("reuse", reuse), ("clean", clean))
    }
    result = {
        "benchmark": "reuse",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "cpu_flags": sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}),
        },
        "corpus": {"scale": args.scale, **changes},
        "runs": runs,
        "changes": reuse["changes"],
        "compared": compared,
        "delta": exported,
        "duplicates": dups,
        "ratios": {
            "reuse_over_full_wall": round(reuse["wall_s"] / full["wall_s"], 3),
            "reuse_over_clean_wall": round(reuse["wall_s"] / clean["wall_s"], 3),
            "encoded_is_changed_and_added": encoded_exactly(reuse["changes"], compared),
        },
        "targets": TARGETS,
        "bench_s": round(time.time() - started),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reuse.json").write_text(json.dumps(result, indent=2) + "\n")
    report(result, console)


def report(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"Re-embedding {result['corpus']['scale']}x Cranfield with 1% edited, "
                  "0.5% added, 0.5% removed (MiniLM + SPLADE-tiny + BM25, fp32)")  # fmt: skip
    for column in (
        "run",
        "wall s",
        "chunks",
        f"encoded {DENSE.split('/')[-1]}",
        f"encoded {SPLADE}",
    ):
        table.add_column(column, justify="left" if column == "run" else "right")
    for name, run in result["runs"].items():
        table.add_row(
            name, f"{run['wall_s']:,.1f}", f"{run['chunks']:,}",
            f"{run['encoded'].get(DENSE, 0):,}", f"{run['encoded'].get(SPLADE, 0):,}",
        )  # fmt: skip
    console.print(table)
    ratios, compared, exported, dups = (
        result["ratios"], result["compared"], result["delta"], result["duplicates"],
    )  # fmt: skip
    console.print(
        f"reuse wall / full wall: {ratios['reuse_over_full_wall']:.3f} (target ≤ 0.1); "
        f"/ clean wall: {ratios['reuse_over_clean_wall']:.3f}"
    )
    console.print(
        f"changed and added chunks: {compared['changed_or_added_chunks']:,}; encoded exactly "
        f"those (a repeat within a unit once): {ratios['encoded_is_changed_and_added']}; "
        "same chunk ids as clean: "
        f"{compared['same_chunk_ids_as_clean']}; reused bit for bit: "
        f"{compared['reused_bit_identical_to_full']}; recomputed vs clean max |Δ| "
        f"{compared['recomputed_max_abs_vs_clean']:.2e} (target ≤ 1e-5); reused vs clean "
        f"{compared['reused_max_abs_vs_clean']:.2e}"
    )
    console.print(
        f"delta (BM25 left out): {exported['counts']['upserts']:,} upserts, "
        f"{exported['counts']['deletes']:,} deletes, {exported['bytes']:,} bytes = "
        f"{exported['share_of_job']:.1%} of the job's parts, in {exported['wall_s']} s"
    )
    console.print(
        f"duplicates: {dups['mirrors']} mirrored documents ({dups.get('placement', '')}); "
        f"{dups['encoded']:,} texts encoded for {dups['chunks']:,} chunks "
        f"({dups['distinct_texts']:,} distinct); mirrors bit for bit their originals: "
        f"{dups.get('mirrors_bit_identical')}"
    )
    console.print(f"cpu: {result['machine']['cpu_flags']}")


if __name__ == "__main__":
    main()

"""Scale: the fleet on 1x, 10x and 100x Cranfield, with a dense model small enough that
orchestration, not the model, is the bottleneck; and the export's bytes per format.

Collections: N copies of Cranfield with new ids (``<id>-c<copy>``) and texts that differ
(``common.copied_documents``), as JSONL. The dense
model is the bundled BERT-tiny (the SPLADE folder's encoder) saved as a
sentence-transformer with mean pooling, built by the bench itself. Each size runs on a
private Redis with one dense worker and ``--aggregate-workers`` aggregate workers, the
producer as a user runs it (``embed-collections run``), output to a local folder.

Per run: wall time; per-stage chunks/s (prepare: the fleet's chunk phase, dense,
export, from the manifest);
peak RSS of the producer, of each worker (main process + pool) and Redis's
``used_memory_peak``, each also per chunk; output bytes per chunk; the time from the
last encoded batch to the manifest; and what one poll of the live view costs (ms, at
the job's end, with every unit recorded).

Prepare (``--prepare-workers``): the largest collection prepared (validated, checked for
duplicate ids, chunked and staged) by 1, 2, ... prepare workers with no encoder running,
so they have the cores: chunks/s from the job's start to its seal, against the same
collection validated and chunked by one process (the producer's way, ``--prepare-on
producer``'s code) in the same run.

Formats (``--formats``): Cranfield with MiniLM + SPLADE + BM25 exported as Parquet and
as JSONL (embedded fleet), the chunk parts' bytes of each and their ratio.

Demo (``--demo``): the README's demo job (Cranfield, MiniLM + SPLADE + BM25, bf16) from
its start to its manifest, against bare sentence-transformers in bf16 encoding the same
chunk texts with every core (dense, then SPLADE), in the same run.

Usage: python bench/scale.py [--sizes 1,10,100] [--aggregate-workers 1,2]
       [--prepare-workers 1,2] [--formats/--no-formats] [--demo/--no-demo]
Writes bench/results/scale.json and bench/results/scale.png, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from common import REPO, chunk_texts, cli_job, copied_documents
from rich.console import Console
from rich.table import Table

from producer.local_fleet import LocalFleet
from shared.control.ledger import JobLedger, connect, recent_jobs
from shared.inputs.models import BUNDLED_SPLADE, resolve_model
from workers.inference.precision import cpu_flags

CRANFIELD = REPO / "examples" / "cranfield" / "corpus.jsonl"
CACHE = REPO / "bench" / ".cache"


def tiny_dense_model() -> Path:
    """BERT-tiny (the bundled SPLADE model's encoder) with mean pooling, as a
    sentence-transformer folder (built once, kept in bench/.cache)."""
    folder = CACHE / "bert-tiny-mean"
    if (folder / "modules.json").is_file():
        return folder
    from sentence_transformers import SentenceTransformer, models

    encoder = models.Transformer(str(resolve_model(BUNDLED_SPLADE).path), max_seq_length=256)
    pooling = models.Pooling(encoder.get_word_embedding_dimension(), "mean")
    SentenceTransformer(modules=[encoder, pooling]).save(str(folder))
    return folder


def collection(copies: int) -> Path:
    """``copies`` copies of Cranfield as one JSONL file (:func:`common.copied_documents`:
    new ids, and no two copies share a text, so no unit encodes fewer texts)."""
    path = CACHE / f"cranfield-x{copies}-distinct.jsonl"
    if path.is_file():
        return path
    with path.open("w") as out:
        for row in copied_documents(copies):
            line = {"id": row["_id"], "title": row.get("title", ""), "text": row["text"]}
            out.write(json.dumps(line) + "\n")
    return path


class PeakRss(threading.Thread):
    """Samples the RSS of named process trees every 0.2 s; keeps each one's peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.trees: dict[str, int] = {}
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def watch(self, name: str, pid: int) -> None:
        with self.lock:
            self.trees[name] = pid

    def run(self) -> None:
        while not self.stop.wait(0.2):
            with self.lock:
                trees = dict(self.trees)
            for name, pid in trees.items():
                try:
                    root = psutil.Process(pid)
                    rss = root.memory_info().rss + sum(
                        child.memory_info().rss for child in root.children(recursive=True)
                    )
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), rss)


def fleet_run(
    source: Path, model: Path, aggregators: int, out: Path, prepare_on: str = "fleet"
) -> dict[str, Any]:
    """One job on a private fleet: one dense worker, ``aggregators`` aggregate workers
    (which also prepare the collection, as in the compose file, unless ``prepare_on``
    is ``producer``: then the producer prepares it alone, the serial way)."""
    queues = ("dense", *(["aggregate,prepare"] * aggregators))
    rss = PeakRss()
    with LocalFleet(queues) as fleet:
        for name, proc in fleet.workers:
            rss.watch(f"worker#{name}", proc.pid)
        rss.start()
        env = {
            **{k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"},
            "REDIS_URL": fleet.redis_url,
            "HF_HUB_OFFLINE": "1",
        }
        started = time.perf_counter()
        cli = subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "run", str(source), "--output", str(out),
             "--dense-models", str(model), "--prepare-on", prepare_on, "--json"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        rss.watch("producer", cli.pid)
        stdout, stderr = cli.communicate()
        wall = time.perf_counter() - started
        rss.stop.set()
        if cli.returncode != 0:
            sys.exit(f"job failed ({cli.returncode}):\n{stderr[-3000:]}")
        summary = [json.loads(line) for line in stdout.splitlines() if '"summary"' in line][-1]
        manifest = summary["manifest"]
        client = connect(fleet.redis_url)
        ledger = JobLedger(client, recent_jobs(client, 1)[0])
        last_encode = max(r.finished_at for r in ledger.reports("dense"))
        polls = []
        for _ in range(5):
            begun = time.perf_counter()
            ledger.progress(detail=True)
            polls.append(time.perf_counter() - begun)
        redis_peak = int(client.info("memory")["used_memory_peak"])
    chunks = manifest["counts"]["chunks"]
    parts = [a for a in manifest["artifacts"] if a["key"] in manifest["chunks"]["parts"]]
    stages = manifest["stages"]
    workers = {k.split("#", 1)[1]: v for k, v in rss.peaks.items() if "#" in k}
    return {
        "documents": manifest["counts"]["documents"],
        "chunks": chunks,
        "batches": manifest["counts"]["batches"],
        "aggregate_workers": aggregators,
        "prepare_on": prepare_on,
        "wall_s": round(wall, 1),
        "chunks_per_s": {
            "prepare": stages["chunk" if prepare_on == "fleet" else "produce"]["items_per_s"],
            "dense": stages["dense"]["items_per_s"],
            "export": stages["export"]["items_per_s"],
        },
        "parts": len(parts),
        "bytes_per_chunk": round(sum(a["bytes"] for a in parts) / chunks, 1),
        "last_encode_to_manifest_s": round(manifest["finished_at"] - last_encode, 2),
        "poll_ms": round(1000 * min(polls), 2),
        "peak_rss": {"producer": rss.peaks.get("producer", 0), **workers},
        "redis_used_memory_peak": redis_peak,
    }


def prepare_run(source: Path, model: Path, workers: int) -> dict[str, Any]:
    """The collection prepared by ``workers`` prepare workers (and an aggregate worker
    for the steps between the phases), no encoder: from the job's start to its seal."""
    with LocalFleet(("aggregate", *(["prepare"] * workers))) as fleet:
        env = {
            **{k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"},
            "REDIS_URL": fleet.redis_url,
            "HF_HUB_OFFLINE": "1",
        }
        with tempfile.TemporaryDirectory(prefix="embed-fleet-prepare-") as out:
            submitted = subprocess.run(
                [sys.executable, "-m", "producer.cli", "run", str(source), "--output", out,
                 "--dense-models", str(model), "--detach"],
                cwd=REPO, env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            job_id = submitted.stdout.strip().splitlines()[-1]
            ledger = JobLedger(connect(fleet.redis_url), job_id)
            while not ledger.phase_opened("encode"):
                fleet.check()
                time.sleep(0.1)
            sealed = time.time()
            spec, report = ledger.spec(), ledger.producer_report()
            assert report is not None
            stages = {s: len(ledger.reports(s)) for s in ("validate", "dedupe", "chunk")}
    wall = sealed - spec.created_at
    return {
        "workers": workers,
        "chunks": report.chunks,
        "units": stages,
        "start_to_seal_s": round(wall, 1),
        "chunks_per_s": round(report.chunks / wall),
    }


def one_process_prepare(source: Path, model: Path) -> dict[str, Any]:
    """The same collection validated, then chunked, in one process (the producer's
    way): its chunks/s."""
    from producer.jobs import validate
    from shared.inputs.chunking import Chunker, ChunkTally, chunk_batches, load_tokenizer
    from shared.inputs.sources import documents, open_source
    from shared.records.schemas import Document

    chunker = Chunker(load_tokenizer(str(model)), 256)
    started = time.perf_counter()
    found = open_source(source)
    validate(found, "fail")
    accepted = (r for r in documents(found, "fail") if isinstance(r, Document))
    tally = ChunkTally()
    for _ in chunk_batches(chunker, accepted, 128, tally):
        pass
    wall = time.perf_counter() - started
    return {
        "chunks": tally.chunks,
        "wall_s": round(wall, 1),
        "chunks_per_s": round(tally.chunks / wall),
    }


def formats_run(docs: int) -> dict[str, Any]:
    """Cranfield (its first ``docs`` documents; 0: all), MiniLM + SPLADE + BM25, chunk
    part bytes as Parquet and as JSONL."""
    source = REPO / "examples" / "cranfield"
    if docs:
        source = CACHE / f"cranfield-first-{docs}.jsonl"
        source.write_text("\n".join(CRANFIELD.read_text().splitlines()[:docs]) + "\n")
    out: dict[str, Any] = {"documents": docs or 1400}
    for fmt in ("parquet", "jsonl"):
        manifest = cli_job(source, ["--enable-sparse", "--format", fmt])
        parts = [a for a in manifest["artifacts"] if a["key"] in manifest["chunks"]["parts"]]
        out[fmt] = {
            "chunks": manifest["counts"]["chunks"],
            "bytes": sum(a["bytes"] for a in parts),
            "bytes_per_chunk": round(sum(a["bytes"] for a in parts) / manifest["counts"]["chunks"]),
            "wall_s": manifest["wall_s"],
        }
    out["parquet_over_jsonl"] = round(out["parquet"]["bytes"] / out["jsonl"]["bytes"], 3)
    return out


def demo_run(dtype: str) -> dict[str, Any]:
    """The README's demo (Cranfield, MiniLM + SPLADE + BM25, in ``dtype``) against bare
    sentence-transformers in the same dtype on the same chunk texts with every core: the
    job's wall from its start to its manifest over the sum of the two bare encodes."""
    import torch
    from sentence_transformers import SentenceTransformer, SparseEncoder

    from producer.jobs import JobOptions
    from shared.inputs.models import DEFAULT_DENSE_MODEL

    texts = chunk_texts(
        JobOptions(
            source=str(REPO / "examples" / "cranfield"),
            output=tempfile.mkdtemp(),
            dense_models=[DEFAULT_DENSE_MODEL],
        )
    )
    torch.set_num_threads(os.cpu_count() or 1)
    bare: dict[str, float] = {}
    for name, kind, path in (
        ("dense", SentenceTransformer, resolve_model(DEFAULT_DENSE_MODEL).path),
        ("sparse", SparseEncoder, resolve_model(BUNDLED_SPLADE).path),
    ):
        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        model = kind(str(path), device="cpu", model_kwargs={"torch_dtype": torch_dtype})
        model.encode(texts[:32])
        started = time.perf_counter()
        model.encode(texts)
        bare[name] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    manifest = cli_job(REPO / "examples" / "cranfield", ["--enable-sparse", "--dtype", dtype])
    job_s = manifest["finished_at"] - manifest["created_at"]
    return {
        "dtype": dtype,
        "chunks": len(texts),
        "bare_s": bare,
        "bare_sum_s": round(sum(bare.values()), 1),
        "job_start_to_manifest_s": round(job_s, 1),
        "command_wall_s": manifest["wall_s"],
        "ratio": round(job_s / sum(bare.values()), 3),
        "models": {m["name"]: m["dtype"] for m in manifest["models"]},
    }


def gpu_name() -> str | None:
    """The CUDA device the dense worker runs on, if any."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def native_dtype() -> str:
    return "bf16" if {"amx_bf16", "avx512_bf16"} & cpu_flags() else "fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,10,100", help="copies of Cranfield per run")
    parser.add_argument(
        "--aggregate-workers", default="1,2", help="aggregate workers, tried at the largest size"
    )
    parser.add_argument(
        "--prepare-workers", default="1,2", help="prepare workers, tried at the largest size"
    )
    parser.add_argument(
        "--prepare-on",
        choices=["fleet", "producer"],
        default="fleet",
        help="who prepares the collections of the size runs (producer: the serial way)",
    )
    parser.add_argument("--formats", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--formats-docs", type=int, default=0, help="formats: first N docs")
    parser.add_argument("--demo", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--demo-dtype",
        choices=["bf16", "fp32"],
        default=None,
        help="the demo's dtype (default: bf16 where the CPU has AMX/AVX512-BF16, else fp32)",
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    parser.add_argument(
        "--merge", action="store_true", help="keep what --out holds for the parts not run now"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    CACHE.mkdir(parents=True, exist_ok=True)
    model = tiny_dense_model()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    aggregators = [int(a) for a in args.aggregate_workers.split(",") if a]  # "": prepare only
    runs = []
    console = Console(width=200)
    with tempfile.TemporaryDirectory(prefix="embed-fleet-scale-") as tmp:
        for size in sizes if aggregators else []:
            for count in aggregators if size == max(sizes) else aggregators[:1]:
                console.print(f"[bold]{size}x Cranfield, {count} aggregate worker(s)[/]")
                out = Path(tmp) / f"x{size}-{count}"
                run = fleet_run(collection(size), model, count, out, args.prepare_on)
                run["size"] = size
                runs.append(run)
                console.print(run)
        prepares: list[dict[str, Any]] = []
        if sizes and args.prepare_workers:
            largest = collection(max(sizes))
            alone = one_process_prepare(largest, model)
            console.print({"one process": alone})
            for count in [int(w) for w in args.prepare_workers.split(",")]:
                run = prepare_run(largest, model, count)
                run["size"] = max(sizes)
                run["over_one_process"] = round(run["chunks_per_s"] / alone["chunks_per_s"], 2)
                prepares.append(run)
                console.print(run)
    result = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "bf16_flags": sorted({"amx_bf16", "avx512_bf16"} & cpu_flags()),
            "python": platform.python_version(),
            "gpu": gpu_name(),
        },
        "model": "BERT-tiny (bundled SPLADE encoder) + mean pooling, 128-d",
        "runs": runs,
        "prepare": {"one_process": alone, "fleet": prepares} if prepares else None,
        "formats": formats_run(args.formats_docs) if args.formats else None,
        "demo": demo_run(args.demo_dtype or native_dtype()) if args.demo else None,
    }
    if args.merge and Path(args.out).is_file():
        kept = json.loads(Path(args.out).read_text())
        for part in ("runs", "prepare", "formats", "demo"):
            if not result[part]:
                result[part] = kept.get(part)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    report(result, console)
    if result["runs"]:
        plot(result["runs"], Path(args.out).with_suffix(".png"))


def report(result: dict[str, Any], console: Console) -> None:
    table = Table(title="scale (wall, per-stage chunks/s, peak RSS MiB, Redis peak MiB)")
    for column in ("size", "prep", "chunks", "agg", "wall s", "prepare/s", "dense/s", "export/s",
                   "last encode→manifest s", "poll ms", "producer", "dense", "aggregate",
                   "redis", "B/chunk"):  # fmt: skip
        table.add_column(column, justify="right")
    mib = 2**20
    for run in result["runs"]:
        rss = run["peak_rss"]
        aggregate = max((v for k, v in rss.items() if k.startswith("aggregate")), default=0)
        dense = max((v for k, v in rss.items() if k.startswith("dense")), default=0)
        speeds = run["chunks_per_s"]
        table.add_row(
            f"{run['size']}x", run.get("prepare_on", "fleet"), str(run["chunks"]),
            str(run["aggregate_workers"]),
            f"{run['wall_s']:.1f}", f"{speeds['prepare']:.0f}", f"{speeds['dense']:.0f}",
            f"{speeds['export']:.0f}", f"{run['last_encode_to_manifest_s']:.1f}",
            f"{run['poll_ms']:.1f}", f"{rss.get('producer', 0) / mib:.0f}", f"{dense / mib:.0f}",
            f"{aggregate / mib:.0f}", f"{run['redis_used_memory_peak'] / mib:.1f}",
            f"{run['bytes_per_chunk']:.0f}",
        )  # fmt: skip
    console.print(table)
    prepare = result.get("prepare")
    if prepare:
        alone = prepare["one_process"]
        for run in prepare["fleet"]:
            console.print(
                f"prepare {run['size']}x with {run['workers']} prepare worker(s): "
                f"{run['chunks_per_s']} chunks/s (start to seal {run['start_to_seal_s']} s), "
                f"{run['over_one_process']}x one process ({alone['chunks_per_s']} chunks/s)"
            )
    formats = result["formats"]
    if formats:
        parquet, jsonl = (formats[f]["bytes_per_chunk"] for f in ("parquet", "jsonl"))
        console.print(
            f"Cranfield ({formats['documents']} docs), MiniLM + SPLADE + BM25: Parquet "
            f"{parquet} B/chunk, JSONL {jsonl} B/chunk, ratio {formats['parquet_over_jsonl']}"
        )
    demo = result["demo"]
    if demo:
        console.print(
            f"Demo ({demo['dtype']}): job start to manifest {demo['job_start_to_manifest_s']} s "
            f"vs bare dense {demo['bare_s']['dense']} s + SPLADE {demo['bare_s']['sparse']} s "
            f"= {demo['bare_sum_s']} s: ratio {demo['ratio']}"
        )


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    single = [r for r in runs if r["aggregate_workers"] == runs[0]["aggregate_workers"]]
    chunks = [r["chunks"] for r in single]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(chunks, [r["wall_s"] for r in single], "o-", label="wall")
    left.plot(chunks, [r["chunks"] / r["chunks_per_s"]["prepare"] for r in single], "s--",
              label="prepare (fleet)")  # fmt: skip
    left.set(xscale="log", yscale="log", xlabel="chunks", ylabel="seconds", title="Job wall time")
    left.legend()
    for stage in ("prepare", "dense", "export"):
        right.plot(chunks, [r["chunks_per_s"][stage] for r in single], "o-", label=stage)
    right.set(
        xscale="log", yscale="log", xlabel="chunks", ylabel="chunks/s", title="Per-stage throughput"
    )
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

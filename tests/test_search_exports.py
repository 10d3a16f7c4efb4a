"""Exports for search engines, from a real job: FAISS finds the fleet's own dense top-10
for the Cranfield queries, and the pyserini lines hold every chunk with the artifact's
weights, quantised."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from conftest import CRANFIELD, base_env, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A third of Cranfield with its 225 queries, dense + BM25, fused by the dense score
    alone (so the results' order is the dense ranking), on the embedded fleet; in fp32,
    as the test encodes the queries (on a CPU with bf16 the policy would pick bf16 for
    the fleet)."""
    folder = tmp_path_factory.mktemp("cranfield") / "cranfield"
    folder.mkdir()
    lines = (CRANFIELD / "corpus.jsonl").read_text().splitlines(keepends=True)
    (folder / "corpus.jsonl").write_text("".join(lines[:450]))
    (folder / "queries.jsonl").write_text((CRANFIELD / "queries.jsonl").read_text())
    out = tmp_path_factory.mktemp("exports") / "out"
    result = run_cli(
        "run", str(folder), "--output", str(out), "--sparse-models", "bm25",
        "--alpha", "1.0", "--top-k", "20", "--dtype", "fp32", "--json",
        env=base_env(), timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")][-1]
    return out, summary["manifest"]


def test_faiss_returns_the_fleets_dense_top_10(job, tmp_path: Path) -> None:
    import faiss
    from sentence_transformers import SentenceTransformer

    from shared.inputs.models import DEFAULT_DENSE_MODEL, resolve_model

    out, manifest = job
    exported = run_cli(
        "export", manifest["job_id"], "--to", "faiss", str(tmp_path / "faiss"),
        "--output", str(out), env=base_env(),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    report = json.loads((tmp_path / "faiss" / "export.json").read_text())
    (path,) = [f["path"] for f in report["files"] if f["model"] == DEFAULT_DENSE_MODEL]
    index = faiss.read_index(path)
    ids = (tmp_path / "faiss" / "ids.txt").read_text().splitlines()
    assert index.ntotal == len(ids) == manifest["counts"]["chunks_exported"]
    job_dir = out / manifest["collection"] / manifest["job_id"]
    results = [json.loads(x) for x in (job_dir / "results.jsonl").read_text().splitlines()]
    model = SentenceTransformer(str(resolve_model(DEFAULT_DENSE_MODEL).path), device="cpu")
    queries = model.encode([r["text"] for r in results], normalize_embeddings=True)
    scores, found = index.search(np.asarray(queries, dtype=np.float32), 10)
    differ = 0
    for result, row_scores, row in zip(results, scores, found, strict=True):
        ranked = sorted(
            (c for c in result["candidates"] if c["dense_score"] is not None),
            key=lambda c: -c["dense_score"],
        )
        fleet = [c["chunk_id"] for c in ranked[:10]]
        faiss_top = [ids[i] for i in row]
        if set(faiss_top) != set(fleet):  # (the order within may differ on float noise)
            differ += 1
            # Only a near tie at the cut may put a different chunk tenth.
            gap = abs(float(row_scores[9]) - ranked[9]["dense_score"])
            assert len(set(faiss_top) ^ set(fleet)) == 2 and gap < 1e-4, (result["query_id"], gap)
    assert len(results) == 225 and differ <= 3


def test_pyserini_lines_hold_every_chunk_with_its_weights(job, tmp_path: Path) -> None:
    out, manifest = job
    exported = run_cli(
        "export", manifest["job_id"], "--to", "pyserini-sparse", str(tmp_path / "pys"),
        "--output", str(out), "--quantize", "100", env=base_env(),
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    lines = [
        json.loads(line)
        for path in sorted((tmp_path / "pys" / "bm25").glob("part-*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    job_dir = out / manifest["collection"] / manifest["job_id"]
    table = ds.dataset(job_dir / "chunks", format="parquet").to_table()
    vocab = json.loads((job_dir / "vocab" / "bm25.json").read_text())
    assert [line["id"] for line in lines] == table.column("chunk_id").to_pylist()
    assert [line["contents"] for line in lines] == table.column("text").to_pylist()
    for line, cell in zip(lines, table.column("sparse_bm25").to_pylist(), strict=True):
        want = {
            vocab[i]: round(w * 100) for i, w in zip(cell["indices"], cell["values"], strict=True)
        }
        assert line["vector"] == {t: v for t, v in want.items() if v > 0}
        assert all(isinstance(v, int) for v in line["vector"].values())
    assert sum(1 for line in lines if line["vector"]) > 0.95 * len(lines)


def test_nothing_to_export_is_one_clear_error(job, tmp_path: Path) -> None:
    out, _ = job
    missing = run_cli(
        "export",
        "no-such-job",
        "--to",
        "faiss",
        str(tmp_path),
        "--output",
        str(out),
        env=base_env(),
    )
    assert missing.returncode == 2 and "no finished job 'no-such-job'" in missing.stderr

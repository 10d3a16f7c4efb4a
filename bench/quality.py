"""Retrieval quality on Cranfield: each single ranking and the default fusion.

Runs the product as a user does (``embed-collections run examples/cranfield
--enable-sparse``, embedded local fleet, every default), reads ``metrics.json`` and
prints nDCG@10 / Recall@100 / MRR@10 per ranking next to the reference figures of the
issue. The bar: the default fused ranking beats the best single ranking by >= 0.02
nDCG@10. Writes ``bench/results/quality.json``.

    python bench/quality.py [--fusion convex|rrf] [--extra-args "..."]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CRANFIELD = REPO / "examples" / "cranfield"
RESULTS = REPO / "bench" / "results" / "quality.json"

# What the issue's own script measured on Cranfield (nDCG@10), for comparison.
REFERENCE = {
    "sparse:bm25": 0.369,
    "dense": 0.382,
    "sparse:splade-tiny": 0.355,
    "fused (dense+SPLADE, alpha 0.5)": 0.411,
    "fused (dense+SPLADE+BM25, 0.5/0.25/0.25)": 0.422,
}
SINGLE = ("dense", "sparse:splade-tiny", "sparse:bm25")


def run_job(output: Path, extra: list[str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CELERY_BROKER_URL")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    command = [
        sys.executable,
        "-m",
        "producer.cli",
        "run",
        str(CRANFIELD),
        "--enable-sparse",
        "--output",
        str(output),
        "--json",
        *extra,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    summary = [json.loads(line) for line in done.stdout.splitlines() if '"summary"' in line][-1]
    manifest: dict[str, Any] = summary["manifest"]
    manifest["wall_s"] = round(time.perf_counter() - started, 1)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra-args", default="", help="more `run` options, quoted")
    args = parser.parse_args()
    extra = shlex.split(args.extra_args)
    with tempfile.TemporaryDirectory(prefix="embed-fleet-quality-") as tmp:
        manifest = run_job(Path(tmp), extra)
    metrics = manifest["metrics"]
    assert isinstance(metrics, dict)
    spec = manifest["spec"]
    assert isinstance(spec, dict)
    weights = spec["retrieval"]["weights"]
    rows = []
    print(
        f"Cranfield, {manifest['counts']['chunks']} chunks, 225 queries; fusion "
        f"{spec['retrieval']['fusion']} {weights}"
    )
    print(f"{'ranking':<22} {'nDCG@10':>8} {'R@100':>8} {'MRR@10':>8}")
    for name, values in metrics.items():
        rows.append({"ranking": name, **values})
        print(
            f"{name:<22} {values['ndcg_at_10']:>8.4f} {values['recall_at_100']:>8.4f} "
            f"{values['mrr_at_10']:>8.4f}"
        )
    best_single = max(SINGLE, key=lambda n: metrics[n]["ndcg_at_10"])
    margin = metrics["fused"]["ndcg_at_10"] - metrics[best_single]["ndcg_at_10"]
    verdict = "PASS" if margin >= 0.02 else "FAIL"
    print(f"fused - best single ({best_single}) = {margin:+.4f} nDCG@10 (bar +0.02): {verdict}")
    print(
        "reference (issue's script, nDCG@10): "
        + ", ".join(f"{k} {v}" for k, v in REFERENCE.items())
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "collection": "cranfield",
                "command": "python bench/quality.py " + args.extra_args,
                "chunks": manifest["counts"]["chunks"],
                "fusion": spec["retrieval"]["fusion"],
                "weights": weights,
                "rankings": rows,
                "best_single": best_single,
                "fused_minus_best_single_ndcg10": round(margin, 4),
                "bar": 0.02,
                "verdict": verdict,
                "reference_ndcg10": REFERENCE,
                "wall_s": manifest["wall_s"],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()

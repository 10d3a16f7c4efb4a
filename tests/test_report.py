"""``report.html``: what it shows, that user strings are escaped, that ``finish`` writes
it (or goes on without it), and that a real browser (headless Chromium) loads it with
no console message and finds its charts in the rendered DOM."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import browser
import pytest
from browser import needs_chromium

from shared.records.job_store import JobStore
from shared.records.schemas import (
    BatchReport,
    Counts,
    CrossEncoderRerankRun,
    JobSpec,
    LatencySummary,
    Manifest,
    Metrics,
    Missing,
    ModelInfo,
    RankingMetrics,
    RetrievalSpec,
)
from shared.records.storage import LocalStore
from workers.aggregate import finish
from workers.aggregate.report import render_report

START = 1_750_000_000.0
CHARTS = ["throughput", "latency", "batch-sizes", "memory", "rerank", "quality"]
HOSTILE = "<script>alert(1)</script>"


def unit(stage: str, n: int, at: float, seconds: float, **extra: object) -> BatchReport:
    defaults: dict[str, object] = {
        "chunks": 120,
        "tokens": 9000,
        "worker": "w1@host",
        "device": "cpu",
        "batch_sizes": [5 + n % 7, 17, 30 + n % 9],
        "peak_memory_bytes": (700 + 10 * n) * 2**20,
        "peak_memory_kind": "rss",
    }
    fields = defaults | extra
    return BatchReport(
        batch_id=f"{stage}-{n:04d}",
        stage=stage,
        started_at=START + at,
        finished_at=START + at + seconds,
        **fields,  # type: ignore[arg-type]
    )


def job_reports(rerank: bool = True) -> dict[str, list[BatchReport]]:
    """Units of a small judged, reranked job: 12 batches per encode stage (one of them
    found done by a resume, so without timings), a query batch, retrieve, fuse, rerank
    and export tasks."""
    reports: dict[str, list[BatchReport]] = {
        "validate": [unit("validate", i, 1 + i, 0.4, batch_sizes=[]) for i in range(3)],
        "chunk": [unit("chunk", i, 3 + i, 0.9, batch_sizes=[]) for i in range(3)],
        "dense": [unit("dense", i, 6 + 9 * i, 8.0 + i % 3) for i in range(11)],
        "sparse": [
            unit("sparse", i, 6 + 13 * i, 12.0 + i % 4, peak_memory_kind="gpu", device="cuda:0")
            for i in range(11)
        ],
        "retrieve": [
            unit("retrieve", i, 160, 2.0, chunks=225, batch_sizes=[], kind="queries")
            for i in range(2)
        ],
        "fuse": [unit("fuse", i, 163, 0.5, chunks=64, batch_sizes=[]) for i in range(4)],
        "export": [unit("export", 0, 180, 1.4, chunks=1320, batch_sizes=[])],
    }
    for stage in ("dense", "sparse"):
        reports[stage].append(BatchReport.recovered_unit(stage, f"{stage}-rec", 120, "documents"))
        reports[stage].append(unit(stage, 99, 150, 0.2, chunks=225, kind="queries"))
    if rerank:
        reports["rerank"] = [
            unit("rerank", i, 165 + i, 1.0, chunks=15, batch_sizes=[64, 64, 96], kind="queries")
            for i in range(15)
        ]
        reports["rerank"][3].items_missed = 50
    return reports


def job(
    collection: str = "cranfield",
    judged: bool = True,
    rerank: bool = True,
    queries: bool = True,
    model: str = "sentence-transformers/all-MiniLM-L6-v2",
) -> tuple[Manifest, Metrics, dict[str, list[BatchReport]]]:
    reports = job_reports(rerank)
    stages = {"produce": LatencySummary.from_samples([0.3], 1440, 1.2)}
    stages |= {
        name: LatencySummary.from_reports(
            [r for r in units if r.kind == "documents" or name not in ("dense", "sparse")]
        )
        for name, units in reports.items()
    }
    retrieval = (
        RetrievalSpec("queries.jsonl", 225, 1, "qrels/test.tsv" if judged else None)
        if queries
        else None
    )
    spec = JobSpec(
        job_id="20250615-000000-abcdef",
        collection=collection,
        source="examples/cranfield",
        output="./embed-out",
        created_at=START,
        dense_models=[model],
        chunk_tokens=256,
        chunk_overlap=32,
        batch_chunks=128,
        max_batch_tokens=None,
        on_bad_record="skip",
        stages=["dense", "sparse"],
        sparse_models=["splade-tiny", "bm25"],
        retrieval=retrieval,
    )
    models = [
        ModelInfo(
            model,
            "wheel",
            "abc123",
            384,
            "float32",
            "cpu",
            256,
            "dense",
            "auto: no bf16 on this CPU",
            22_700_000,
        ),
        ModelInfo(
            "splade-tiny",
            "folder",
            "def456",
            30522,
            "float32",
            "cuda:0",
            512,
            "sparse",
            "fp16 asked",
            4_400_000,
        ),
    ]
    rerank_run = None
    if rerank:
        rerank_model = ModelInfo("tiny-ce", "folder", "", 1, "float32", "cpu", 512, "rerank")
        models.append(rerank_model)
        rerank_run = CrossEncoderRerankRun(
            model=rerank_model,
            device="cpu",
            dtype="float32",
            queries=225,
            pairs_asked=11250,
            pairs_scored=11200,
            coverage=11200 / 11250,
            batch_sizes={64: 30, 96: 15},
            oom_count=1,
            timeout_count=0,
            fallbacks={"split": 1},
            max_batch_tokens=8192,
            latency=stages["rerank"],
        )
    rankings = {}
    if judged and queries:
        names = ["dense", "sparse:splade-tiny", "sparse:bm25", "fused"] + (
            ["reranked"] if rerank else []
        )
        rankings = {
            name: RankingMetrics(0.30 + 0.02 * i, 0.70 + 0.01 * i, 0.50 + 0.01 * i, 225)
            for i, name in enumerate(names)
        }
    metrics = Metrics(
        job_id=spec.job_id,
        collection=collection,
        stages=stages,
        qrels="qrels/test.tsv" if rankings else "",
        queries_judged=225 if rankings else 0,
        rankings=rankings,
        fusion="convex" if queries else None,
    )
    manifest = Manifest(
        format_version=3,
        job_id=spec.job_id,
        collection=collection,
        status="partial",
        spec=spec,
        models=models,
        counts=Counts(1400, 1320, 1200, 12, 2, 1, 1),
        stages=stages,
        artifacts=[],
        missing=[Missing("dense", "batch-7", "CUDA error: <unknown>", ["d1#0", "d2#0"])],
        empty_documents=["470", "995"],
        skipped_records=[],
        created_at=START,
        finished_at=START + 190.0,
        rerank_run=rerank_run,
        metrics=rankings or None,
    )
    return manifest, metrics, reports


def section(page: str, name: str) -> str:
    match = re.search(rf'<section id="{name}"[^>]*>(.*?)</section>', page, re.DOTALL)
    assert match, f"no section {name}"
    return match.group(1)


def test_the_report_has_every_section_with_its_chart_and_caption() -> None:
    page = render_report(*job())
    assert page.startswith("<!DOCTYPE html>")
    for name in browser.REPORT_SECTIONS:
        section(page, name)
    for name in CHARTS:
        figure = re.search(
            rf'<figure class="chart" id="chart-{name}">\s*<svg .*?</svg>\s*'
            r"<figcaption>[^<]+</figcaption>",
            page,
            re.DOTALL,
        )
        assert figure, f"no chart {name}"
    assert page.count("<figure") == len(CHARTS)
    # Self-contained: no script, nothing to fetch, and a policy that allows neither.
    assert "<script" not in page
    assert not re.search(r'\s(src|href)="(?!#)', page)
    assert "Content-Security-Policy" in page
    # Each chart's ids are its own (inline SVGs share one id space).
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    # The header's counts, the models with their dtype reasons, the missing unit.
    summary = section(page, "summary")
    for text in ("1,400", "1,320 (1,200 exported)", "partial", "3:10 min"):
        assert text in summary
    assert re.search(r"<dt>recovered units</dt><dd>2</dd>", summary)
    models = section(page, "models")
    assert "auto: no bf16 on this CPU" in models and "22.7 M" in models
    assert "CUDA error: &lt;unknown&gt;" in section(page, "missing")
    rerank = section(page, "rerank")
    assert "11,200 scored" in rerank and "50 missed" in rerank and "split 1" in rerank
    quality = section(page, "quality")
    assert "225 judged queries" in quality and "reranked" in quality
    assert "0.360" in quality  # a bar's label
    memory = section(page, "memory")
    assert "dense (RSS)" in memory and "sparse (GPU)" in memory and "rerank (RSS)" in memory
    # Every stage's timed units: an encode stage's collection batches (not its query
    # batch, not the recovered one), every unit of the others (query tasks).
    latency = section(page, "latency")
    assert "dense 11, sparse 11, retrieve 2, fuse 4, export 1, rerank 15." in latency


def test_user_strings_are_escaped_everywhere() -> None:
    manifest, metrics, reports = job(collection=HOSTILE, model='<img src=x onerror="alert(2)">')
    metrics.rankings[f"sparse:{HOSTILE}"] = RankingMetrics(0.1, 0.2, 0.3, 225)
    manifest.missing[0].batch_id = HOSTILE
    page = render_report(manifest, metrics, reports)
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in page
    assert f"sparse:{HOSTILE}" not in page  # the chart's tick label is SVG text, escaped


def test_a_job_without_judgements_or_rerank_says_so() -> None:
    page = render_report(*job(judged=False, rerank=False))
    assert "Not judged: the job had no relevance judgements" in section(page, "quality")
    assert "The job did not rerank." in section(page, "rerank")
    assert 'id="chart-quality"' not in page and 'id="chart-rerank"' not in page
    page = render_report(*job(queries=False, rerank=False))
    assert "Not judged: the job had no queries." in section(page, "quality")


def test_recovered_units_are_counted_and_left_out_of_the_charts() -> None:
    manifest, metrics, reports = job()
    # A resume found every export unit done: the stage has no timings at all.
    reports["export"] = [BatchReport.recovered_unit("export", "part-00000", 1320, "documents")]
    page = render_report(manifest, metrics, reports)
    assert re.search(r"<dt>recovered units</dt><dd>3</dd>", section(page, "summary"))
    assert "export 1" not in section(page, "latency")  # the caption's unit counts
    # Every unit recovered: the timing charts say so instead.
    everything = {
        stage: [BatchReport.recovered_unit(stage, r.batch_id, r.chunks, r.kind) for r in units]
        for stage, units in reports.items()
    }
    page = render_report(manifest, metrics, everything)
    assert "No timed units." in section(page, "throughput")
    assert "No timed units." in section(page, "latency")
    assert 'id="chart-quality"' in page


def test_the_same_job_renders_the_same_bytes() -> None:
    assert render_report(*job()) == render_report(*job())


def test_finish_writes_the_report_and_goes_on_without_it_when_it_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    manifest, metrics, reports = job()
    store = JobStore(LocalStore(tmp_path), manifest.collection, manifest.job_id)
    artifact = finish.write_report(store, manifest, metrics, reports)
    assert artifact is not None and artifact.key.endswith("/report.html")
    body = (tmp_path / artifact.key).read_bytes()
    assert (artifact.bytes, artifact.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert artifact.content_type == "text/html" and b'id="chart-throughput"' in body
    assert len(body) < 500_000

    def broken(*args: object) -> str:
        raise ValueError("no such font")

    monkeypatch.setattr(finish, "render_report", broken)
    (tmp_path / artifact.key).unlink()
    with caplog.at_level(logging.WARNING, logger="embed_fleet"):
        assert finish.write_report(store, manifest, metrics, reports) is None
    assert not (tmp_path / artifact.key).exists()
    (record,) = [r for r in caplog.records if "report.html" in r.getMessage()]
    assert record.fields["error"] == "ValueError: no such font"  # type: ignore[attr-defined]


# --- in a real browser ---------------------------------------------------------------


@needs_chromium
def test_chromium_sees_a_console_error(tmp_path: Path) -> None:
    """The console check can fail: a page that throws is caught."""
    page = tmp_path / "throws.html"
    page.write_text('<!DOCTYPE html><p>x</p><script>throw new Error("deliberate")</script>')
    _, console = browser.load(page, tmp_path / "profile")
    assert any("Uncaught Error: deliberate" in line for line in console), console


@needs_chromium
def test_chromium_loads_the_report_with_its_charts_and_no_console_message(
    tmp_path: Path,
) -> None:
    report = tmp_path / "report.html"
    report.write_text(render_report(*job(collection=HOSTILE)))
    browser.check_report(report, tmp_path / "profile", CHARTS)

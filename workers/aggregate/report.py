"""``report.html``: a finished job's figures as one page that opens offline.

:func:`render_report` turns what ``finish`` has at hand (the manifest it is about to
write, the metrics, every unit's :class:`BatchReport` from the ledger) into one HTML
string: a header with the job's counts, the stages' figures, throughput over time,
latency, model batch sizes, peak memory, rerank coverage, retrieval quality per ranking
(with judgements) and the models with their dtype reasons.

Why matplotlib, rendered to SVG and inlined: the page must be one file with nothing to
fetch (no CDN, no script), and matplotlib, which the benchmarks already use, draws each
chart here in a few lines. SVG keeps the charts sharp at any zoom and small (tens of KiB
each), and with ``svg.fonttype: none`` their text stays text (selectable, no glyph
outlines). No pyplot: each chart is a bare :class:`~matplotlib.figure.Figure` saved by
the SVG canvas, so no GUI backend or global figure list is involved, and matplotlib is
imported only when a report is rendered. The page's Content-Security-Policy allows no
script and no fetch at all.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from shared.records.schemas import BatchReport, Manifest, Metrics
from shared.records.text import human_bytes, peak_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.typing import RcKeyType

_THROUGHPUT_BINS = 60
_MISSING_ROWS = 50
_QUALITY = (("ndcg_at_10", "nDCG@10"), ("recall_at_100", "Recall@100"), ("mrr_at_10", "MRR@10"))
# Nothing may load or run: the page is complete as it is.
_CSP = "default-src 'none'; style-src 'unsafe-inline'"
_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 12px 20px; color: #1d2330; }
h1 { font-size: 21px; margin: 2px 0; } h2 { font-size: 16px; margin: 2px 0 8px; }
.sub { color: #5b6475; margin: 0 0 12px; }
main { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 14px; }
section { border: 1px solid #e2e5ec; border-radius: 6px; padding: 10px 14px; min-width: 0; }
section.wide { grid-column: 1 / -1; }
dl { display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr));
     gap: 2px 16px; margin: 0; }
dl div { display: flex; gap: 8px; min-width: 0; } dl div.long { grid-column: span 2; }
dt { color: #5b6475; white-space: nowrap; } dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 13px; width: 100%; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #eceef3; }
.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0; } figure svg { width: 100%; height: auto; display: block; }
figcaption, .note { color: #5b6475; font-size: 12.5px; margin: 4px 0 0; }
.complete { color: #1a7f37; font-weight: 600; } .partial { color: #b35900; font-weight: 600; }
"""


def render_report(
    manifest: Manifest, metrics: Metrics, reports: Mapping[str, Sequence[BatchReport]]
) -> str:
    """The job's ``report.html``.

    Args:
        manifest: The job's manifest (its ``artifacts`` as they are before the report).
        metrics: The job's ``metrics.json`` (retrieval quality, when judged).
        reports: Stage -> the units its workers recorded in the ledger. Units a resume
            found done in the store (``recovered``) have no timings: they are counted,
            and left out of the timing charts.

    Returns:
        One self-contained HTML document.
    """
    import matplotlib

    job = _Job.of(manifest, reports)
    # Text as text, ids stable from run to run, labels never read as mathtext ($...$).
    style: dict[RcKeyType, Any] = {
        "svg.fonttype": "none",
        "svg.hashsalt": "embed-fleet-report",
        "text.parse_math": False,
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "legend.fontsize": 8,
        "legend.frameon": False,
    }
    with matplotlib.rc_context(style):
        sections = [
            _summary(job),
            _stage_table(job),
            _throughput(job),
            _latency(job),
            _batch_sizes(job),
            _memory(job),
            _rerank(job),
            _reuse(job),
            _quality(job, metrics),
            _models(job),
            _missing(job),
        ]
    title = escape(f"{manifest.collection} · job {manifest.job_id}")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>embed-fleet report · {title}</title>\n<style>{_CSS}</style>\n"
        f"</head>\n<body>\n<h1>{title}</h1>\n"
        f'<p class="sub">embed-fleet job report · finished {_utc(manifest.finished_at)}</p>\n'
        "<main>\n" + "".join(sections) + "</main>\n</body>\n</html>\n"
    )


@dataclass
class _Job:
    """The report's view of a job: its manifest, and per stage its units.

    Attributes:
        timed: Stage -> its units with timings, less the recovered ones; of an encode
            stage, the collection's batches only (as in ``metrics.json``: query
            batches are tiny).
        recovered: Stage -> units a resume found done (no figures).
        colors: Stage with timed units -> its color in every chart, in the manifest's
            stage order.
    """

    manifest: Manifest
    reports: Mapping[str, Sequence[BatchReport]]
    timed: dict[str, list[BatchReport]]
    recovered: dict[str, int]
    colors: dict[str, str]

    @classmethod
    def of(cls, manifest: Manifest, reports: Mapping[str, Sequence[BatchReport]]) -> _Job:
        encode = set(manifest.spec.stages)
        timed = {
            stage: [
                r
                for r in units
                if not r.recovered and (r.kind == "documents" or stage not in encode)
            ]
            for stage, units in reports.items()
        }
        recovered = {stage: sum(r.recovered for r in units) for stage, units in reports.items()}
        names = [s for s in dict.fromkeys([*manifest.stages, *reports]) if timed.get(s)]
        colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
        return cls(manifest, reports, timed, recovered, colors)

    @property
    def timed_stages(self) -> list[str]:
        """Stages with at least one timed unit, in the manifest's order."""
        return list(self.colors)


# --- sections ------------------------------------------------------------------------


def _summary(job: _Job) -> str:
    m = job.manifest
    counts = m.counts
    status = escape(m.status)
    facts = [
        ("job", escape(m.job_id)),
        ("collection", escape(m.collection)),
        ("status", f'<span class="{status}">{status}</span>'),
        ("started", _utc(m.created_at)),
        ("duration", _duration(m.finished_at - m.created_at)),
        ("documents", f"{counts.documents:,}"),
        ("chunks", f"{counts.chunks:,} ({counts.chunks_exported:,} exported)"),
        ("batches", f"{counts.batches:,}"),
        ("empty documents", f"{counts.empty_documents:,}"),
        ("skipped records", f"{counts.skipped_records:,}"),
        ("failed units", f"{counts.failed_batches:,}"),
        ("recovered units", f"{sum(job.recovered.values()):,}"),
        ("source", f"<code>{escape(m.spec.source)}</code>"),
        ("output", f"<code>{escape(m.spec.output)}</code>"),
    ]
    return _section("summary", "Job", _facts(facts, long=("source", "output")), wide=True)


def _stage_table(job: _Job) -> str:
    head = ["stage", "units", "items", "items/s", "p50 s", "p95 s", "batch sizes"]
    head += ["peak memory", "OOM", "recovered"]
    rows = [
        [
            escape(name),
            f"{s.batches:,}",
            f"{s.items:,}",
            f"{s.items_per_s:.1f}",
            f"{s.p50_s:.3f}",
            f"{s.p95_s:.3f}",
            f"{s.batch_size_min}/{s.batch_size_p50}/{s.batch_size_max}"
            if s.batch_size_max
            else "-",
            peak_text(s),
            str(s.oom_count),
            str(job.recovered.get(name, 0)),
        ]
        for name, s in job.manifest.stages.items()
    ]
    note = _note(
        "Throughput: items over the stage's wall-clock span. Latency: per unit (a staged "
        "batch, a prepare range, a retrieve, fuse, rerank or export task). Model batch "
        "sizes: min/p50/max."
    )
    return _section("stages", "Stages", _table(head, rows), note, wide=True)


def _throughput(job: _Job) -> str:
    stages = job.timed_stages
    if not stages:
        return _section("throughput", "Throughput over time", _note("No timed units."))
    start = job.manifest.created_at
    span = max(max(r.finished_at for s in stages for r in job.timed[s]) - start, 1e-3)
    scale, unit = (60.0, "min") if span > 900 else (1.0, "s")
    edges = np.linspace(0.0, span, _THROUGHPUT_BINS + 1)
    width = float(edges[1] - edges[0])
    fig = _new_figure()
    ax = fig.subplots()
    for stage in stages:
        units = job.timed[stage]
        rate = _binned_items(units, start, edges) / width
        rate[rate <= 0] = np.nan  # no line through idle bins (log scale)
        ax.plot(
            (edges[:-1] + edges[1:]) / 2 / scale,
            rate,
            drawstyle="steps-mid",
            marker="o",
            markersize=2,
            color=job.colors[stage],
            label=stage,
        )
    _log_scale(ax, "y")
    ax.set_xlim(0, span / scale)
    ax.set_xlabel(f"time since the job started ({unit})")
    ax.set_ylabel("items/s")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    caption = (
        f"Items per second of each stage in bins of {_duration(width)} (log scale); a "
        "unit's items are spread over the time it ran."
    )
    return _section("throughput", "Throughput over time", _chart("throughput", fig, caption))


def _binned_items(units: Sequence[BatchReport], start: float, edges: np.ndarray) -> np.ndarray:
    """Items per time bin: each unit's spread evenly over its run; an instant unit's in
    the bin it ended in."""
    began = np.array([r.started_at - start for r in units])
    ended = np.array([r.finished_at - start for r in units])
    items = np.array([r.chunks for r in units], dtype=float)
    overlap = np.minimum(ended[:, None], edges[None, 1:]) - np.maximum(
        began[:, None], edges[None, :-1]
    )
    duration = (ended - began)[:, None]
    share = np.divide(overlap.clip(0.0), duration, out=np.zeros_like(overlap), where=duration > 0)
    instant = np.flatnonzero(duration[:, 0] <= 0)
    last = len(edges) - 2
    share[instant, np.searchsorted(edges, ended[instant], side="right").clip(1, last + 1) - 1] = 1
    totals: np.ndarray = (items[:, None] * share).sum(axis=0)
    return totals


def _latency(job: _Job) -> str:
    stages = job.timed_stages
    if not stages:
        return _section("latency", "Unit latency", _note("No timed units."))
    fig = _new_figure(height=0.9 + 0.32 * len(stages))
    ax = fig.subplots()
    names = list(reversed(stages))
    data = [[max(r.latency_s, 1e-3) for r in job.timed[s]] for s in names]
    # Whiskers at the 5th and 95th percentiles, and the slowest unit, rather than every
    # outlier: the chart's size does not grow with the job.
    boxes = ax.boxplot(
        data,
        orientation="horizontal",
        tick_labels=names,
        whis=(5, 95),
        showfliers=False,
        patch_artist=True,
        widths=0.6,
        medianprops={"color": "black"},
    )
    for box, stage in zip(boxes["boxes"], names, strict=True):
        box.set_facecolor(job.colors[stage])
        box.set_alpha(0.6)
    slowest = [max(values) for values in data]
    ax.scatter(slowest, range(1, len(names) + 1), marker="x", s=14, color="black", zorder=3)
    _log_scale(ax, "x")
    ax.set_xlabel("seconds per unit (log scale)")
    counts = ", ".join(f"{s} {len(job.timed[s])}" for s in stages)
    caption = (
        "Seconds per unit, per stage: median, quartiles, whiskers at the 5th and 95th "
        f"percentiles, × the slowest unit. Units: {counts}."
    )
    return _section("latency", "Unit latency", _chart("latency", fig, caption))


def _batch_sizes(job: _Job) -> str:
    sizes = {s: [size for r in job.timed[s] for size in r.batch_sizes] for s in job.timed_stages}
    sizes = {s: values for s, values in sizes.items() if values}
    if not sizes:
        note = _note("No stage ran model batches.")
        return _section("batch-sizes", "Model batch sizes", note)
    # One panel a stage, on one axis: encode stages often batch alike, and would hide
    # each other in one panel.
    fig = _new_figure(height=0.7 + 0.9 * len(sizes))
    axes = fig.subplots(len(sizes), 1, sharex=True, squeeze=False)[:, 0]
    every = np.concatenate([np.array(v) for v in sizes.values()])
    bins = np.histogram_bin_edges(every, bins=min(40, int(every.max() - every.min()) + 1))
    for ax, (stage, values) in zip(axes, sizes.items(), strict=True):
        ax.hist(values, bins=bins.tolist(), color=job.colors[stage])
        ax.set_ylabel(stage)
    axes[-1].set_xlabel("items per model batch")
    caption = (
        "Model batches by the items (chunks, queries or query-candidate pairs) each held, "
        "one panel a stage."
    )
    return _section("batch-sizes", "Model batch sizes", _chart("batch-sizes", fig, caption))


def _memory(job: _Job) -> str:
    peaks: dict[tuple[str, str], int] = {}
    for stage in job.timed_stages:
        for r in job.timed[stage]:
            if r.peak_memory_bytes:
                key = (stage, "GPU" if r.peak_memory_kind == "gpu" else "RSS")
                peaks[key] = max(peaks.get(key, 0), r.peak_memory_bytes)
    if not peaks:
        return _section("memory", "Peak memory", _note("No unit reported its memory."))
    fig = _new_figure(height=0.9 + 0.32 * len(peaks))
    ax = fig.subplots()
    keys = list(reversed(peaks))
    values = [peaks[k] / 2**20 for k in keys]
    bars = ax.barh(
        [f"{stage} ({kind})" for stage, kind in keys],
        values,
        color=[job.colors[stage] for stage, _ in keys],
    )
    ax.bar_label(bars, labels=[human_bytes(peaks[k]) for k in keys], padding=3, fontsize=8)
    ax.set_xlim(0, max(values) * 1.2)
    ax.set_xlabel("MiB")
    ax.grid(axis="y", visible=False)
    caption = (
        "Largest peak of any unit, per stage: GPU is torch's max_memory_allocated, RSS "
        "the CPU worker's resident memory."
    )
    return _section("memory", "Peak memory", _chart("memory", fig, caption))


def _rerank(job: _Job) -> str:
    run = job.manifest.rerank_run
    if run is None:
        return _section("rerank", "Rerank coverage", _note("The job did not rerank."))
    reranked = min(sum(r.chunks for r in job.reports.get("rerank", [])), run.queries)
    rows = [
        ("queries", reranked, run.queries - reranked),
        ("pairs", run.pairs_scored, run.pairs_asked - run.pairs_scored),
    ]
    fig = _new_figure(height=1.6)
    ax = fig.subplots()
    labels = [name for name, _, _ in rows]
    done = np.array([100 * d / max(d + m, 1) for _, d, m in rows])
    ax.barh(labels, done, color="#2a9d55", label="scored")
    ax.barh(labels, 100 - done, left=done, color="#d9534f", label="missed")
    for y, (_, scored, missed) in enumerate(rows):
        text = f"{scored:,} scored · {missed:,} missed"
        ax.text(2, y, text, va="center", color="white", fontsize=8, fontweight="bold")
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of those asked")
    ax.grid(visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fallbacks = ", ".join(f"{k} {v}" for k, v in run.fallbacks.items()) or "none"
    model = run.model.name if run.model else "-"
    facts = [
        ("model", escape(model)),
        ("device", escape(f"{run.device} {run.dtype}")),
        ("coverage", f"{run.coverage:.4f}"),
        ("OOM retries", str(run.oom_count)),
        ("timeouts", str(run.timeout_count)),
        ("fallbacks", escape(fallbacks)),
    ]
    caption = "Queries whose candidates were reranked, and query-candidate pairs scored."
    chart = _chart("rerank", fig, caption)
    return _section("rerank", "Rerank coverage", chart, _facts(facts, long=("model",)))


def _reuse(job: _Job) -> str:
    """What a ``--reuse`` job took from its earlier job (nothing for other jobs)."""
    changes = job.manifest.changes
    if changes is None:
        return ""
    against = changes.against_job or changes.against
    if changes.refused:
        note = f"Nothing was reused from job {against}: {changes.refused}. Every chunk was encoded."
        return _section("reuse", "Reuse", _note(note))
    earlier = escape(against)
    documents = changes.documents
    facts = [
        ("earlier job", earlier),
        ("documents", escape(
            f"{documents.added:,} added · {documents.changed:,} changed · "
            f"{documents.removed:,} removed · {documents.unchanged:,} unchanged"
        )),
        ("chunks found there", f"{changes.chunks_found:,} of {changes.chunks:,}"),
    ]  # fmt: skip
    rows = [
        [
            escape(model),
            f"{reused:,}",
            f"{changes.encoded.get(model, 0):,}",
            f"{changes.repeats.get(model, 0):,}",
        ]
        for model, reused in changes.reused.items()
    ]
    table = _table(["model", "reused", "encoded", "repeats served"], rows)
    lost = (
        _note(f"{changes.chunks_lost:,} found chunks were encoded after all: {changes.lost}")
        if changes.lost
        else ""
    )
    return _section("reuse", "Reuse", _facts(facts, long=("documents",)), table, lost)


def _quality(job: _Job, metrics: Metrics) -> str:
    title = "Retrieval quality"
    if job.manifest.spec.retrieval is None:
        return _section("quality", title, _note("Not judged: the job had no queries."))
    if not metrics.rankings:
        note = "Not judged: the job had no relevance judgements (qrels)."
        return _section("quality", title, _note(note))
    names = list(metrics.rankings)
    fig = _new_figure(height=3.2)
    ax = fig.subplots()
    x = np.arange(len(names))
    width = 0.8 / len(_QUALITY)
    for i, (field, label) in enumerate(_QUALITY):
        values = [float(getattr(metrics.rankings[n], field)) for n in names]
        bars = ax.bar(x + (i - 1) * width, values, width, label=label, color=f"C{i}")
        ax.bar_label(bars, fmt="%.3f", fontsize=6.5, padding=1)
    ax.set_xticks(x, names, rotation=15, ha="right", rotation_mode="anchor")
    ax.set_ylim(0, 1.05)
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fusion = metrics.fusion or "-"
    caption = (
        f"{metrics.queries_judged} judged queries (qrels: {metrics.qrels or '-'}); fusion "
        f"{fusion}; documents scored by {metrics.document_score}."
    )
    return _section("quality", title, _chart("quality", fig, caption))


def _models(job: _Job) -> str:
    head = ["model", "kind", "dim", "dtype", "why this dtype", "device", "max seq", "parameters"]
    rows = [
        [
            escape(m.name),
            escape(m.kind),
            f"{m.dim:,}",
            escape(m.dtype),
            escape(m.dtype_reason or "-"),
            escape(m.device),
            f"{m.max_seq_length:,}",
            f"{m.parameters / 1e6:,.1f} M" if m.parameters else "-",
        ]
        for m in job.manifest.models
    ]
    if not rows:
        return _section("models", "Models", _note("No model was recorded."), wide=True)
    return _section("models", "Models", _table(head, rows, numeric=(2, 6, 7)), wide=True)


def _missing(job: _Job) -> str:
    missing = job.manifest.missing
    if not missing:
        return ""
    rows = [
        [
            escape(m.stage),
            f"<code>{escape(m.batch_id)}</code>",
            f"{len(m.chunk_ids):,}",
            escape(m.reason),
        ]
        for m in missing[:_MISSING_ROWS]
    ]
    more = len(missing) - len(rows)
    note = _note(f"and {more:,} more: see the manifest's missing list.") if more > 0 else ""
    table = _table(["stage", "unit", "chunks", "reason"], rows, numeric=(2,))
    return _section("missing", f"Missing ({len(missing):,} failed units)", table, note, wide=True)


# --- building blocks -----------------------------------------------------------------


def _new_figure(height: float = 3.4) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(6.4, height), layout="constrained")


def _log_scale(ax: Axes, which: Literal["x", "y"]) -> None:
    """A log axis labelled 0.1, 1, 10 (the default labels are mathtext, which the
    report turns off so that no label is read as TeX)."""
    from matplotlib.ticker import NullFormatter, StrMethodFormatter

    if which == "x":
        ax.set_xscale("log")
    else:
        ax.set_yscale("log")
    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def _chart(name: str, fig: Figure, caption: str) -> str:
    """A figure as inline SVG, with its ids made unique to it on the page."""
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # no XML prolog or doctype inside HTML
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, count=1, flags=re.DOTALL)
    svg = re.sub(r'\b(id="|url\(#|href="#)', rf"\g<1>{name}-", svg)
    label = escape(caption, quote=True)
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{label}" ', 1)
    return (
        f'<figure class="chart" id="chart-{name}">\n{svg}\n'
        f"<figcaption>{escape(caption)}</figcaption>\n</figure>\n"
    )


def _section(section_id: str, title: str, *parts: str, wide: bool = False) -> str:
    kind = ' class="wide"' if wide else ""
    body = "\n".join(p for p in parts if p)
    return f'<section id="{section_id}"{kind}>\n<h2>{escape(title)}</h2>\n{body}\n</section>\n'


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """An HTML table of already escaped cells; ``numeric`` columns right-aligned (every
    column but the first when none are named)."""
    right = set(numeric) if numeric else set(range(1, len(head)))

    def cell(tag: str, i: int, text: str) -> str:
        return f'<{tag} class="n">{text}</{tag}>' if i in right else f"<{tag}>{text}</{tag}>"

    lines = ["<tr>" + "".join(cell("th", i, escape(h)) for i, h in enumerate(head)) + "</tr>"]
    lines += [
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows
    ]
    return "<table>\n" + "\n".join(lines) + "\n</table>"


def _facts(facts: Sequence[tuple[str, str]], long: Sequence[str] = ()) -> str:
    """A list of name: value (values already escaped); ``long`` ones take two columns."""
    items = []
    for name, value in facts:
        kind = ' class="long"' if name in long else ""
        items.append(f"<div{kind}><dt>{name}</dt><dd>{value}</dd></div>")
    return f"<dl>{''.join(items)}</dl>"


def _note(text: str) -> str:
    return f'<p class="note">{escape(text)}</p>'


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d} min"

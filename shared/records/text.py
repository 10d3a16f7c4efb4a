"""How sizes read in text, alike in the live view, the summary table and the report."""

from __future__ import annotations

from shared.records.schemas import LatencySummary


def human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def peak_text(summary: LatencySummary) -> str:
    """A stage's peak memory, ``1.2 GiB RSS`` (a CPU worker's) or ``… GPU``; ``-``
    when none was reported."""
    if not summary.peak_memory_bytes:
        return "-"
    kind = "GPU" if summary.peak_memory_kind == "gpu" else "RSS"
    return f"{human_bytes(summary.peak_memory_bytes)} {kind}"

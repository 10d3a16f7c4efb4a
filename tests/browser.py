"""Loading a page in a real browser: headless Chromium (Debian's ``chromium`` package,
which scripts/setup installs), its console and the DOM it rendered."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
MISSING = "no /usr/bin/chromium: install Debian's chromium package (scripts/setup does, as root)"
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason=MISSING)

REPORT_SECTIONS = [
    "summary",
    "stages",
    "throughput",
    "latency",
    "batch-sizes",
    "memory",
    "rerank",
    "quality",
    "models",
]
"""The sections every ``report.html`` has, in order (then ``missing``, when a unit failed)."""


def load(page: Path, profile: Path) -> tuple[str, list[str]]:
    """Load a page in headless Chromium: the DOM it rendered, and every line the page's
    console logged (errors, uncaught exceptions, policy violations, any message)."""
    result = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=2000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    console = [
        line for line in result.stderr.splitlines() if re.search(r"CONSOLE[(:]|Uncaught", line)
    ]
    return result.stdout, console


def check_report(report: Path, profile: Path, charts: list[str]) -> None:
    """A ``report.html`` loads in Chromium without a console message, with its sections
    and each of ``charts`` an SVG element of its figure in the rendered DOM."""
    if not CHROMIUM.exists():
        pytest.skip(MISSING)
    dom, console = load(report, profile)
    assert console == []
    found = re.findall(r'<figure class="chart" id="chart-([\w-]+)">\s*<svg\b[^>]*>', dom)
    assert found == charts
    for name in charts:
        figure = dom.split(f'id="chart-{name}"', 1)[1].split("</figure>", 1)[0]
        assert "<path" in figure and "<figcaption>" in figure
    sections = re.findall(r'<section id="([\w-]+)"', dom)
    assert sections[: len(REPORT_SECTIONS)] == REPORT_SECTIONS

"""The package builds quietly: no deprecation banner, the licence as an SPDX expression;
and its processes import the model libraries only where they run a model."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


def test_the_wheel_builds_without_deprecation_warnings(tmp_path: Path) -> None:
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"),
            *("-v", "-w", str(tmp_path), str(REPO)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    said = (built.stdout + built.stderr).lower()
    assert "deprecat" not in said, [line for line in said.splitlines() if "deprecat" in line]
    (wheel,) = tmp_path.glob("embed_fleet-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(name).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()


def test_a_worker_process_imports_torch_only_when_it_runs_a_model() -> None:
    """``celery -A workers.app`` imports every task module: an aggregator or a preparing
    worker that imported torch and transformers there took 2.0 s to start instead of
    0.5 s, and held their memory for nothing. The producer never imports them."""
    probe = (
        "import sys, workers.app, producer.cli.app; "
        "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"

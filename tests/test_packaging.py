"""The package builds quietly: no deprecation banner, the licence as an SPDX expression."""

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

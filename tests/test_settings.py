"""Typed settings: every EMBED_FLEET_* variable declared once, read in one place,
checked with an error that names it (the docs' table of them: tests/test_docs.py)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from shared.control.settings import _PARSERS, VARIABLES, Settings, parse_bytes
from shared.records.errors import EmbedFleetError

REPO = Path(__file__).resolve().parents[1]


def test_every_variable_has_a_field_and_a_parser() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)} - {"broker_url"}
    assert {v.field for v in VARIABLES} == set(_PARSERS) == fields


def test_nothing_else_reads_the_environment_for_them() -> None:
    """The one place: outside shared/control/settings.py the environment is read only for other
    tools' variables (Hugging Face, S3, OpenTelemetry, CUDA, the terminal's COLUMNS), each
    named by a literal."""
    others = re.compile(r"^((HF_|XDG_|S3_|AWS_|OTEL_|CUDA_)[A-Z_]*|COLUMNS)$")
    offenders = []
    for package in ("shared", "producer", "workers"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path.name == "settings.py":
                continue
            text = path.read_text()
            for match in re.finditer(
                r"(?:os\.environ(?:\.get)?|os\.getenv)\s*[\(\[]\s*([^,\)\]]+)", text
            ):
                key = match.group(1).strip().strip("\"'")
                if not others.match(key):
                    offenders.append(f"{path.relative_to(REPO)}: reads {match.group(1)!r}")
    assert offenders == []


def test_values_are_typed() -> None:
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://r:6379/0",
            "EMBED_FLEET_MAX_RETRIES": "5",
            "EMBED_FLEET_RERANK_BATCH_TIMEOUT": "0",
            "EMBED_FLEET_MODEL_MEMORY": "800MB",
            "EMBED_FLEET_GPU_WAIT": "yes",
            "EMBED_FLEET_DEVICE": "cuda:1",
            "EMBED_FLEET_LOG_LEVEL": "info",
        }
    )
    assert settings.broker_url == "redis://r:6379/0"
    assert settings.max_retries == 5
    assert settings.rerank_batch_timeout is None  # 0: no limit
    assert settings.model_memory == parse_bytes("800MB") == 800 * 10**6
    assert settings.gpu_wait is True and settings.device == "cuda:1"
    assert settings.log_level == "INFO"
    assert Settings.from_env({}) == Settings(broker_url=None)  # every default


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("EMBED_FLEET_MAX_RETRIES", "lots", "is not a whole number"),
        ("EMBED_FLEET_VISIBILITY_TIMEOUT", "soon", "is not a number"),
        ("EMBED_FLEET_GPU_WAIT", "perhaps", "is not a yes/no value"),
        ("EMBED_FLEET_DEVICE", "gpu0", "is not a device"),
        ("EMBED_FLEET_MODEL_MEMORY", "big", "is not a size"),
        ("EMBED_FLEET_TORCH_THREADS", "0", "is not a whole number >= 1"),
        ("EMBED_FLEET_MAX_DELIVERIES", "0", "is not a whole number >= 1"),
    ],
)
def test_bad_values_name_the_variable_and_the_fix(variable: str, value: str, says: str) -> None:
    with pytest.raises(EmbedFleetError, match=f"{variable}='{value}' {says}") as raised:
        Settings.from_env({variable: value})
    assert raised.value.fix


def test_a_bad_value_stops_the_cli_with_one_line(tmp_path: Path) -> None:
    from conftest import base_env, run_cli

    done = run_cli("status", env=base_env(EMBED_FLEET_MAX_RETRIES="-1"), cwd=tmp_path)
    assert done.returncode == 2
    assert "EMBED_FLEET_MAX_RETRIES='-1' is not a whole number" in done.stderr
    assert "Traceback" not in done.stderr

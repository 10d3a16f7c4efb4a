"""Settings read from the environment, in one place, shared by the producer and the workers.

Every ``EMBED_FLEET_*`` variable is declared in :data:`VARIABLES` (name, default,
meaning; the docs' configuration table is generated from it, with
:data:`OTHER_VARIABLES`, those read through Celery, boto3, OpenTelemetry and Hugging
Face) and read by :meth:`Settings.from_env`,
which checks each and says what is wrong with a bad value. Nothing else in the project
reads them. Workers on other hosts get the same settings from their own environment, so
nothing secret travels in messages: a message names a job, each process brings its own
credentials.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from shared.records.errors import EmbedFleetError

ENV_PREFIX = "EMBED_FLEET_"
# Where a worker started without REDIS_URL / CELERY_BROKER_URL looks for its broker.
DEFAULT_WORKER_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_OUTPUT = "./embed-out"


# A variable's default is its Settings field's own (shown as the field's value), so the
# documented default cannot drift from the one in effect.
FIELD_DEFAULT = None


@dataclass(frozen=True)
class Variable:
    """One ``EMBED_FLEET_*`` variable: the field it fills, its default in words where
    the field's value does not say it (:data:`FIELD_DEFAULT`: the field's value), and
    what it means."""

    field: str
    default: str | None
    meaning: str

    @property
    def name(self) -> str:
        return ENV_PREFIX + self.field.upper()

    @property
    def shown_default(self) -> str:
        """The default as the docs show it."""
        if self.default is not None:
            return self.default
        value = next(f.default for f in fields(Settings) if f.name == self.field)
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)


@dataclass(frozen=True)
class OtherVariable:
    """A variable the fleet reads through another library, or outside the
    ``EMBED_FLEET_`` prefix; listed so that the docs' table has them all."""

    names: tuple[str, ...]
    default: str
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable("output", FIELD_DEFAULT, "default `--output`"),
    Variable(
        "visibility_timeout",
        FIELD_DEFAULT,
        "seconds before an unacknowledged task is redelivered; keep it above the slowest batch",
    ),
    Variable(
        "unacked_restore_interval",
        "kombu's (≈100 s in effect)",
        "how often workers look for expired tasks of dead workers",
    ),
    Variable(
        "max_retries",
        FIELD_DEFAULT,
        "retries of a failing batch (exponential backoff) before it is recorded as failed",
    ),
    Variable(
        "max_deliveries",
        FIELD_DEFAULT,
        "deliveries of a unit in a row on which its worker process dies (killed by the "
        "kernel, out of memory, a crash in native code) before the unit is recorded as "
        "failed and its message acknowledged, so that it takes down no more workers; "
        "`resume` runs it again",
    ),
    Variable("ledger_ttl", FIELD_DEFAULT, "seconds a finished job's ledger stays in Redis"),
    Variable(
        "transient_window",
        FIELD_DEFAULT,
        "seconds a Redis or S3 call that cannot connect (a restart, a blip; for S3 also a "
        "5xx or SlowDown) is retried, backing off up to 5 s, before the error counts; also "
        "the broker publish retries",
    ),
    Variable(
        "stall_timeout",
        FIELD_DEFAULT,
        "seconds a followed job (`run`, `status --follow`, `resume`) may make no progress "
        "while nothing is queued or running in the fleet before it is re-driven as "
        "`resume` does (0: never)",
    ),
    Variable(
        "queue_wait",
        FIELD_DEFAULT,
        "seconds a followed job may wait on a queue no worker consumes before the follower "
        "names it, with the command that starts such a worker",
    ),
    Variable(
        "unit_seconds",
        FIELD_DEFAULT,
        "seconds of encoding an encode worker takes from a unit of several staged batches, "
        "by its own pace, before it hands the rest back to the queue (at least one batch): "
        "how long another job's unit, or an urgent one, may wait for it",
    ),
    Variable(
        "text_claims",
        FIELD_DEFAULT,
        "distinct chunk texts a job keeps in Redis while it chunks (about 100 bytes each), "
        "so that a text seen again anywhere in the job is encoded once; past it, a text "
        "first seen later is encoded once per encode unit",
    ),
    Variable(
        "log_level", FIELD_DEFAULT, "the fleet's own logs: one JSON object per line on stderr"
    ),
    Variable(
        "rerank_batch_timeout",
        FIELD_DEFAULT,
        "seconds one CrossEncoder batch may run before it is split, moved to the CPU, or "
        "left unreranked (0: no limit)",
    ),
    Variable("device", "auto", "force a dense/rerank worker's device (`cpu`, `cuda`, `cuda:1`)"),
    Variable(
        "gpus",
        "the GPUs CUDA shows",
        "stand-in GPUs, CUDA not asked: `0` runs a dense/rerank worker on the CPU; `N` "
        "fakes N devices of this host (UUIDs `fake-<host>-<i>`); `uuid,uuid` fakes those "
        "devices, as containers given the same GPUs see them (tests, dry runs; to limit "
        "real GPUs use `CUDA_VISIBLE_DEVICES`)",
    ),
    Variable(
        "stop_timeout",
        FIELD_DEFAULT,
        "seconds a worker told to stop (SIGTERM) may spend finishing the unit in hand "
        "before it hands the unit back to its queue and exits (0: hand back at once)",
    ),
    Variable(
        "gpu_wait",
        "unset",
        "`1`: a GPU worker that finds every GPU leased waits for one instead of exiting",
    ),
    Variable(
        "torch_threads",
        "cores ÷ torch workers on the host",
        "torch threads per worker process",
    ),
    Variable(
        "model_memory",
        "half the GPU; no limit on a CPU",
        "memory the models of a worker may take on its device (`2GiB`, `800MB`); least "
        "recently used models go back to the CPU beyond it",
    ),
    Variable(
        "preload",
        "the job's models (embedded fleet)",
        "models a worker stages on the CPU at start: `kind:name[@dtype]`, comma-separated "
        "(kind `dense`, `sparse`, `rerank`)",
    ),
    Variable(
        "speed_verdicts",
        "`<HF_HOME>/embed-fleet/speed-verdicts.json`",
        "the file where `--dtype auto` keeps its probe timings per host, model and "
        "device, so that every worker on a host decides alike",
    ),
    Variable(
        "simulate_oom_tokens",
        "unset",
        "a test hook: model calls above this many padded tokens raise "
        "`torch.cuda.OutOfMemoryError`",
    ),
    Variable(
        "simulate_worker_death",
        "unset",
        "a test hook: a unit whose `<collection>/<job id>/<stage>/<unit>` matches this "
        "pattern (`fnmatch`; an aggregator step's stage is `step`) makes its worker "
        "process SIGKILL itself as it starts, on every delivery",
    ),
    Variable(
        "trace_file",
        "unset",
        "append every span as a JSON line to this file (every process of the fleet)",
    ),
    Variable(
        "trace_console", "unset", "`1`: print spans as JSON (what `run --trace-console` sets)"
    ),
)

OTHER_VARIABLES: tuple[OtherVariable, ...] = (
    OtherVariable(
        ("REDIS_URL", "CELERY_BROKER_URL"),
        "unset",
        "the shared broker and ledger. Unset: `run` starts the embedded local fleet; "
        f"workers fall back to `{DEFAULT_WORKER_BROKER}`",
    ),
    OtherVariable(
        ("S3_ENDPOINT_URL",),
        "AWS",
        "endpoint of an S3-compatible store (SeaweedFS, MinIO, ...); path-style addressing "
        "is used with it",
    ),
    OtherVariable(
        ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"),
        "boto3's",
        "credentials, read by each process from its own environment; never sent in "
        "messages or logged",
    ),
    OtherVariable(
        (
            "OTEL_TRACES_EXPORTER",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_SERVICE_NAME",
            "OTEL_SDK_DISABLED",
        ),
        "tracing off",
        "OpenTelemetry's own variables: `otlp` (or an endpoint) exports spans over "
        "OTLP/HTTP, `console` prints them",
    ),
    OtherVariable(
        ("HF_HOME", "HF_HUB_OFFLINE"),
        "Hugging Face's",
        "the one model cache for dense, sparse and rerank models (`run --model-cache DIR` "
        "sets it for a run and its local workers); offline mode",
    ),
)


def env_name(field: str) -> str:
    """The environment variable of a settings field (``preload`` -> ``EMBED_FLEET_PRELOAD``)."""
    return ENV_PREFIX + field.upper()


def _number(variable: str, raw: str, what: str = "seconds") -> float:
    try:
        return float(raw)
    except ValueError:
        raise EmbedFleetError(
            f"{variable}={raw!r} is not a number", f"Set {variable} to {what}"
        ) from None


def _whole(variable: str, raw: str, minimum: int = 0) -> int:
    if not re.fullmatch(r"\s*\d+\s*", raw) or int(raw) < minimum:
        raise EmbedFleetError(
            f"{variable}={raw!r} is not a whole number >= {minimum}",
            f"Set {variable} to a whole number (or unset it for the default)",
        )
    return int(raw)


def _flag(variable: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise EmbedFleetError(f"{variable}={raw!r} is not a yes/no value", f"Set {variable}=1 or 0")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20}
_UNITS |= {"gib": 2**30, "k": 2**10, "m": 2**20, "g": 2**30}


def parse_bytes(text: str, variable: str = ENV_PREFIX + "MODEL_MEMORY") -> int:
    """``"1.5GiB"``, ``"800MB"``, ``"123456"`` into bytes.

    Raises:
        EmbedFleetError: for anything else, naming the variable.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise EmbedFleetError(
            f"{variable}={text!r} is not a size",
            "Give bytes with an optional unit, e.g. 2GiB, 800MB or 500000000",
        )
    return int(float(match.group(1)) * _UNITS[unit])


def _gpus(variable: str, raw: str) -> int | tuple[str, ...]:
    """A count of stand-in GPUs, or their UUIDs (comma-separated)."""
    value = raw.strip()
    if re.fullmatch(r"\d+", value):
        return int(value)
    uuids = tuple(part.strip() for part in value.split(","))
    if not all(re.fullmatch(r"[A-Za-z0-9._-]{1,128}", uuid) for uuid in uuids):
        raise EmbedFleetError(
            f"{variable}={raw!r} is neither a count nor a list of device UUIDs",
            f"Set {variable} to a whole number (0: CPU) or to UUIDs such as GPU-a,GPU-b "
            "(letters, digits, '.', '_', '-')",
        )
    return uuids


def _device(variable: str, raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", value):
        raise EmbedFleetError(
            f"{variable}={raw!r} is not a device", f"Set {variable} to cpu, cuda or cuda:N"
        )
    return value


@dataclass(frozen=True)
class Settings:
    """Process-wide settings (see :data:`VARIABLES` for each ``EMBED_FLEET_*`` one).

    Attributes:
        broker_url: Redis URL of the broker and ledger (``REDIS_URL`` or
            ``CELERY_BROKER_URL``); ``None`` means "no shared broker configured", which
            makes the CLI start the embedded local fleet.
        visibility_timeout: Seconds before an unacknowledged task is handed to another
            worker. Must exceed the longest task (tasks are idempotent either way).
        unacked_restore_interval: Seconds between kombu's scans for expired
            unacknowledged tasks (``None``: kombu's default). Tests set it low.
        max_retries: Retries of a failing unit before it is recorded as failed.
        max_deliveries: Deliveries of a unit in a row on which its worker process dies
            before the unit is recorded as failed (``workers.runtime.deaths``).
        ledger_ttl: Seconds a finished job's ledger stays in Redis.
        transient_window: Seconds a Redis or S3 call or a broker publish that cannot
            connect is retried before its error counts.
        stall_timeout: Seconds a followed job may make no progress, with nothing queued
            or running, before the follower re-drives it (0: never).
        queue_wait: Seconds a followed job may wait on a queue that no worker consumes
            before the follower says so.
        unit_seconds: Seconds of encoding a worker takes from a unit of several staged
            batches before it hands the rest back (``workers.runtime.pace``).
        text_claims: Distinct chunk texts a job claims in Redis while it chunks
            (``shared.records.served_rows``).
        log_level: Level of the fleet's own structured logs.
        rerank_batch_timeout: Seconds one CrossEncoder model batch may run before it is
            split, moved to the CPU, or left unreranked (``None``: no limit).
        device: A forced device for dense/rerank work (``None``: lease a GPU, else CPU).
        gpus: Stand-in GPUs: a count, or the UUIDs of the devices (``None``: ask CUDA).
        gpu_wait: Wait for a free GPU instead of exiting when all are leased.
        stop_timeout: Seconds a stopping worker may finish its unit before handing it
            back to the queue.
        torch_threads: Torch threads per worker process (``None``: a share of the cores).
        model_memory: Bytes the models of a worker may take on its device (``None``:
            half a GPU, no limit on a CPU).
        preload: Models to stage at worker start (``kind:name[@dtype],...``).
        speed_verdicts: The file of ``auto``'s probe timings (``None``: beside the
            model cache).
        simulate_oom_tokens: Test hook: model calls above this padded size raise CUDA's
            out-of-memory error.
        simulate_worker_death: Test hook: the worker process running a unit that
            matches this pattern SIGKILLs itself as the unit starts.
        trace_file: Append every span as a JSON line here.
        trace_console: Print spans as JSON.
    """

    broker_url: str | None
    output: str = DEFAULT_OUTPUT
    visibility_timeout: float = 3600.0
    unacked_restore_interval: float | None = None
    max_retries: int = 3
    max_deliveries: int = 3
    ledger_ttl: float = 7 * 24 * 3600.0
    transient_window: float = 300.0
    stall_timeout: float = 30.0
    queue_wait: float = 30.0
    unit_seconds: float = 2.5
    text_claims: int = 2_000_000
    log_level: str = "WARNING"
    rerank_batch_timeout: float | None = 120.0
    device: str | None = None
    gpus: int | tuple[str, ...] | None = None
    stop_timeout: float = 30.0
    gpu_wait: bool = False
    torch_threads: int | None = None
    model_memory: int | None = None
    preload: str = ""
    speed_verdicts: str | None = None
    simulate_oom_tokens: int | None = None
    simulate_worker_death: str | None = None
    trace_file: str | None = None
    trace_console: bool = False

    @property
    def worker_broker_url(self) -> str:
        """The broker a worker uses: the configured one, else Redis on localhost."""
        return self.broker_url or DEFAULT_WORKER_BROKER

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and check every variable.

        Raises:
            EmbedFleetError: naming the variable whose value is not valid, and the fix.
        """
        env = os.environ if environ is None else environ
        url = env.get("CELERY_BROKER_URL") or env.get("REDIS_URL") or None
        values: dict[str, Any] = {"broker_url": url}
        for variable in VARIABLES:
            raw = env.get(variable.name, "")
            if raw.strip() == "":
                continue
            values[variable.field] = _PARSERS[variable.field](variable.name, raw)
        return cls(**values)


def _optional_seconds(name: str, raw: str) -> float | None:
    """0 (or less) means no limit."""
    value = _number(name, raw)
    return value if value > 0 else None


_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "output": lambda name, raw: raw,
    "visibility_timeout": _number,
    "unacked_restore_interval": _number,
    "max_retries": _whole,
    "max_deliveries": lambda name, raw: _whole(name, raw, minimum=1),
    "ledger_ttl": _number,
    "transient_window": _number,
    "stall_timeout": _number,
    "queue_wait": _number,
    "unit_seconds": _number,
    "text_claims": _whole,
    "log_level": lambda name, raw: raw.strip().upper(),
    "rerank_batch_timeout": _optional_seconds,
    "device": _device,
    "gpus": _gpus,
    "stop_timeout": _number,
    "gpu_wait": _flag,
    "torch_threads": lambda name, raw: _whole(name, raw, minimum=1),
    "model_memory": lambda name, raw: parse_bytes(raw, name),
    "preload": lambda name, raw: raw.strip(),
    "speed_verdicts": lambda name, raw: raw.strip(),
    "simulate_oom_tokens": _whole,
    "simulate_worker_death": lambda name, raw: raw.strip(),
    "trace_file": lambda name, raw: raw,
    "trace_console": _flag,
}

_USERINFO = re.compile(r"(?<=://)[^@/]*@")


def redact_url(url: str) -> str:
    """Hide the credentials of a URL (``redis://:secret@host`` → ``redis://***@host``)."""
    return _USERINFO.sub("***@", url)

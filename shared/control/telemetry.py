"""OpenTelemetry tracing for the producer and the workers: one trace per job.

The Celery instrumentation puts a ``apply_async/<task>`` span around every publish and
a ``run/<task>`` span around every task run, linked through the message headers, so the
producer's ``embed_fleet.run`` span is the root of every task the job causes (tasks a
worker enqueues, such as the next phase, are children of the task that enqueued them).
Workers add a span per stage unit and per model batch (see ``workers.runtime.measure``).

Tracing is off unless asked for, and the exporters are chosen the standard way:

- ``OTEL_TRACES_EXPORTER=otlp`` or an ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT``: OTLP
  over HTTP, configured by the usual ``OTEL_EXPORTER_OTLP_*`` variables;
- ``OTEL_TRACES_EXPORTER=console`` (or ``--trace-console`` on the CLI): spans printed
  as JSON on stdout (the worker's log for workers);
- ``EMBED_FLEET_TRACE_FILE=path``: every span as one JSON line appended to ``path``
  (each process appends its own lines; for tests and offline analysis);
- ``OTEL_SDK_DISABLED=true`` turns all of it off.

``OTEL_SERVICE_NAME`` overrides the service name (``embed-fleet-producer`` or
``embed-fleet-worker``).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from shared.control.settings import Settings

TRACER_NAME = "embed_fleet"

_configured_pid: int | None = None
_lock = threading.Lock()


def tracing_on() -> bool:
    """Whether spans are recorded at all: a tracer provider was installed (by
    :func:`configure`, or a test's). Asked per model batch, where a span that nobody
    records still costs several microseconds beside a null model's batch."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def tracer() -> trace.Tracer:
    """The fleet's tracer (a no-op one until :func:`configure` installed a provider)."""
    return trace.get_tracer(TRACER_NAME)


class JsonLinesExporter(SpanExporter):
    """Appends each span as one line of JSON (``ReadableSpan.to_json``, compacted).

    One ``write`` per line on a file opened for appending, so the lines of several
    processes writing the same file do not interleave.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        lines = "".join(json.dumps(json.loads(span.to_json())) + "\n" for span in spans)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, lines.encode())
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def wanted_exporters(settings: Settings, console: bool = False) -> list[str]:
    """Which exporters OpenTelemetry's own variables, the settings and the console flag
    ask for."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return []
    names = {n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n}
    wanted: list[str] = []
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if "otlp" in names or (endpoint and "none" not in names):
        wanted.append("otlp")
    if console or "console" in names or settings.trace_console:
        wanted.append("console")
    if settings.trace_file:
        wanted.append("file")
    return wanted


def configure(service: str, settings: Settings, *, console: bool = False) -> bool:
    """Install a tracer provider and instrument Celery, once per process.

    Call it in the producer before it publishes and in every worker process after the
    fork (``worker_process_init``): an exporter's thread does not survive a fork.

    Returns:
        Whether tracing is on.
    """
    global _configured_pid
    wanted = wanted_exporters(settings, console)
    with _lock:
        if not wanted or _configured_pid == os.getpid():
            return bool(wanted)
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            ConsoleSpanExporter,
            SimpleSpanProcessor,
        )

        name = os.environ.get("OTEL_SERVICE_NAME") or service
        provider = TracerProvider(resource=Resource.create({"service.name": name}))
        if "otlp" in wanted:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        if "console" in wanted:
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        if "file" in wanted:
            # Simple, not batched: a worker killed at the end of a run loses nothing.
            exporter = JsonLinesExporter(settings.trace_file or "")
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument()  # type: ignore[no-untyped-call]
        _configured_pid = os.getpid()
        return True


def shutdown() -> None:
    """Flush and stop the exporters (the producer calls it before exiting)."""
    provider = trace.get_tracer_provider()
    stop = getattr(provider, "shutdown", None)
    if stop is not None:
        stop()

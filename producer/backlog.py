"""How much work waits for the fleet, per queue: for ``embed-collections queues`` and
for autoscalers (Prometheus metrics, or KEDA reading ``/queues``).

Celery keeps a Redis queue as a list (``LLEN dense``), but a message a worker has taken
leaves the list at once: it sits in kombu's ``unacked`` hash (field: delivery tag;
value: ``[message, exchange, routing key]``) until the worker acknowledges it after the
unit ran. So ``LLEN`` alone says "empty" while every GPU worker is busy with the last
units, and an autoscaler reading only it (KEDA's Redis list scaler) would scale the
busy workers away. The backlog of a queue is therefore waiting + unacknowledged, plus
the units that jobs' quotas set aside (``run --max-in-flight``): they wait too, in
lists of their own (``shared.control.quotas``).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import msgspec
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from shared.control import pipeline
from shared.control.ledger import PARKED_INDEX
from shared.control.quotas import parked_counts
from shared.records import serializer

# kombu's Redis transport: the hash of delivered, unacknowledged messages, and the
# separator of a queue's per-priority lists (``dense\x06\x163``).
UNACKED_KEY = "unacked"
PRIORITY_SEPARATOR = "\x06\x16"
PRIORITIES = range(1, 10)


class QueueBacklog(msgspec.Struct):
    """One queue's work.

    Attributes:
        waiting: Messages in the queue's lists, not yet taken by a worker.
        unacked: Messages taken by a worker and not yet acknowledged: running, or
            reserved by a worker that will run them next.
        parked: Units set aside by their job's quota (``run --max-in-flight``), each
            published again as one of its job's units ends (``shared.control.quotas``).
        backlog: ``waiting + unacked + parked``: the number to scale on.
        workers: Workers consuming the queue (those that answered in time).
    """

    waiting: int
    unacked: int
    parked: int
    backlog: int
    workers: list[str]


class FleetBacklog(msgspec.Struct):
    """Every queue of the fleet at one moment.

    Attributes:
        queues: By queue name (``dense``, ``sparse``, ``rerank``, ``aggregate``,
            ``prepare``).
        workers_answered: Workers that answered the roll call (``None``: not asked).
        at: When it was read (Unix time).
    """

    queues: dict[str, QueueBacklog]
    workers_answered: int | None
    at: float


def queue_counts(client: redis.Redis) -> tuple[dict[str, int], dict[str, int]]:
    """Waiting and unacknowledged messages per fleet queue, from Redis alone."""
    return waiting_counts(client), unacked_counts(client)


def waiting_counts(client: redis.Redis) -> dict[str, int]:
    """Messages in each fleet queue's lists (priority lists included): one pipeline."""
    pipe = client.pipeline()
    for queue in pipeline.QUEUES:
        pipe.llen(queue)
        for priority in PRIORITIES:
            pipe.llen(f"{queue}{PRIORITY_SEPARATOR}{priority}")
    lengths = iter(pipe.execute())
    return {
        queue: sum(next(lengths) for _ in range(1 + len(PRIORITIES))) for queue in pipeline.QUEUES
    }


def unacked_counts(client: redis.Redis) -> dict[str, int]:
    """Taken, unacknowledged messages per fleet queue (a scan of the ``unacked`` hash,
    each entry's routing key read)."""
    unacked = dict.fromkeys(pipeline.QUEUES, 0)
    for _, raw in client.hscan_iter(UNACKED_KEY, count=500):
        queue = _routing_key(raw)
        if queue in unacked:
            unacked[queue] += 1
    return unacked


def held_by_job(client: redis.Redis) -> Counter[str]:
    """How many units of each job the fleet's workers hold (taken, not acknowledged)."""
    held: Counter[str] = Counter()
    for _, raw in client.hscan_iter(UNACKED_KEY, count=500):
        job_id = _job_of(raw)
        if job_id:
            held[job_id] += 1
    return held


def _job_of(raw: bytes) -> str:
    """The job an ``unacked`` entry's message is for (``""`` if it cannot be read)."""
    try:
        message = json.loads(raw)[0]
        body = base64.b64decode(message["body"])
        args = serializer.loads(body)[0]
        return str(args[0].get("job_id", ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, msgspec.DecodeError):
        return ""


def _routing_key(raw: bytes) -> str:
    """The queue of an ``unacked`` entry (its routing key; direct exchanges route by
    queue name). The message itself is not decoded."""
    try:
        entry = json.loads(raw)
        return str(entry[2])
    except (ValueError, IndexError, TypeError):
        return ""


def consumers(app: Celery, timeout_s: float) -> dict[str, list[str]] | None:
    """Worker names per queue, from the workers that answer within ``timeout_s``
    (``None``: none answered)."""
    answers = app.control.inspect(timeout=timeout_s).active_queues() or {}
    if not answers:
        return None
    out: dict[str, list[str]] = {}
    for worker, queues in sorted(answers.items()):
        for queue in queues or []:
            out.setdefault(str(queue.get("name", "")), []).append(worker)
    return out


def read_backlog(
    client: redis.Redis, app: Celery | None = None, timeout_s: float = 1.0
) -> FleetBacklog:
    """The fleet's backlog; with ``app``, also which workers consume each queue."""
    waiting, unacked = queue_counts(client)
    parked = parked_counts(client, PARKED_INDEX)
    workers = consumers(app, timeout_s) if app is not None else None
    queues = {
        queue: QueueBacklog(
            waiting=waiting[queue],
            unacked=unacked[queue],
            parked=parked.get(queue, 0),
            backlog=waiting[queue] + unacked[queue] + parked.get(queue, 0),
            workers=(workers or {}).get(queue, []),
        )
        for queue in pipeline.QUEUES
    }
    answered = (
        None if app is None else len({w for names in (workers or {}).values() for w in names})
    )
    return FleetBacklog(queues=queues, workers_answered=answered, at=round(time.time(), 3))


def share_of(client: redis.Redis, job_id: str) -> float | None:
    """A job's part of the units the fleet's workers hold (``None``: they hold none)."""
    held = held_by_job(client)
    every = sum(held.values())
    return round(held[job_id] / every, 3) if every else None


def fleet_idle(client: redis.Redis) -> bool:
    """Whether no queue of the fleet holds a message and no worker holds one."""
    # Whether any message is held is one HLEN: no need to scan and route each entry.
    return not any(waiting_counts(client).values()) and not client.hlen(UNACKED_KEY)


_METRICS = (
    ("waiting", "Messages waiting in the queue's Redis lists (what LLEN counts)."),
    ("unacked", "Messages taken by a worker and not yet acknowledged (running or reserved)."),
    ("parked", "Units set aside by their job's quota (run --max-in-flight), to run later."),
    ("backlog", "waiting + unacked + parked: the work the queue's workers have before them."),
    ("workers", "Workers consuming the queue that answered the last roll call."),
)


def prometheus_text(backlog: FleetBacklog) -> str:
    """The backlog in Prometheus' text exposition format (a scrape while Redis is away
    gets a 503, which Prometheus records as ``up == 0``)."""
    lines: list[str] = []
    for field, meaning in _METRICS:
        name = f"embed_fleet_queue_{field}"
        lines += [f"# HELP {name} {meaning}", f"# TYPE {name} gauge"]
        for queue, counts in backlog.queues.items():
            value = getattr(counts, field)
            lines.append(f'{name}{{queue="{queue}"}} {len(value) if field == "workers" else value}')
    return "\n".join(lines) + "\n"


class Exporter:
    """An HTTP endpoint for autoscalers: ``/metrics`` (Prometheus), ``/queues`` (the JSON
    of ``queues --json``, for KEDA's metrics-api trigger), ``/healthz``. Each request
    reads Redis, at most once per ``cache_s`` however many scrapers ask."""

    def __init__(self, read: Callable[[], FleetBacklog], cache_s: float = 1.0) -> None:
        self.read = read
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._last: tuple[float, FleetBacklog] | None = None

    def current(self) -> FleetBacklog:
        with self._lock:
            now = time.monotonic()
            if self._last is None or now - self._last[0] >= self.cache_s:
                self._last = (now, self.read())
            return self._last[1]

    def server(self, host: str, port: int) -> ThreadingHTTPServer:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        body = prometheus_text(exporter.current()).encode()
                        kind = "text/plain; version=0.0.4; charset=utf-8"
                    elif path == "/queues":
                        body, kind = msgspec.json.encode(exporter.current()), "application/json"
                    elif path == "/healthz":
                        body, kind = b"ok\n", "text/plain"
                    else:
                        self.send_error(404, "try /metrics, /queues or /healthz")
                        return
                except (redis.RedisError, OperationalError) as exc:
                    self.send_error(503, f"the fleet's Redis did not answer: {type(exc).__name__}")
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # quiet by default, like the fleet's other logs

        return ThreadingHTTPServer((host, port), Handler)

"""The job ledger in Redis: spec, progress, finished units of work, and phase guards.

Persistence only: what a phase or a stage *means* (which stages a phase waits for, what
status follows it) is the pipeline table's (:mod:`shared.control.pipeline`); this module keeps
the counts and makes each phase transition happen exactly once.

Completion is counted by *distinct unit ids* per stage (hash fields), so a task that
Redis hands out twice never counts twice. Each phase transition fires exactly once:
the first caller that sees every unit accounted for wins that phase's ``SET NX``.

Keys, all under ``embed-fleet:job:<id>:``::

    spec              JobSpec (msgpack)
    state             hash: status, staged_batches, staged_chunks, total_batches,
                      total:<phase>, chunks_done:<stage>, queries_done:<stage>, ...
    staged            hash batch_id -> chunk count (document batches)
    staged-queries    hash batch_id -> query count (query batches)
    ranges-read       hash range id -> 1 (read ranges counted in documents_read)
    texts             hash text key -> the chunk that claimed it first, while the
                      job chunks (shared.records.served_rows; gone at seal)
    done:<stage>      hash unit id -> BatchReport
    failed:<stage>    hash unit id -> BatchFailure
    models            hash model name -> ModelInfo
    producer          ProducerReport
    guard:<phase>     the phase guards
    deliveries:<stage> hash: <unit> -> deliveries started, <unit>:ended -> the
                      deliveries up to the last that ended by itself (done or
                      raised), <unit>:death -> how the last one's worker died
                      (aggregator steps under deliveries:step)
    running:<stage>, parked:<stage>
                      the job's quota of units in flight (shared.control.quotas)
"""

from __future__ import annotations

import secrets
import ssl
import time
import zlib
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec
import redis

from shared.control import pipeline
from shared.control.pipeline import PhaseName
from shared.control.quotas import JobQuota
from shared.control.redis_urls import redis_client
from shared.control.settings import redact_url
from shared.records.errors import EmbedFleetError
from shared.records.schemas import (
    BatchFailure,
    BatchReport,
    JobProgress,
    JobRecord,
    JobSpec,
    JobStatus,
    LatencySummary,
    ModelInfo,
    ProducerReport,
    StageProgress,
)

PREFIX = "embed-fleet"
JOBS_INDEX = f"{PREFIX}:jobs"
PARKED_INDEX = f"{PREFIX}:parked"
"""Every job's parked lists (``shared.control.quotas``) that may hold units -> queue."""
T = TypeVar("T")

# Counts units accounted for per stage of a phase (done, or failed and not later done)
# and, when every stage has all of them and the phase's total is known, takes the
# phase guard for its claimant and sets the next status (ARGV[1]: the total's field,
# ARGV[2]: status, ARGV[3]: the claimant). The claimant that holds the guard gets it
# again: a winner that died before it published the next step is redelivered (its
# message was never acknowledged) and publishes it then. Runs atomically in Redis,
# after the caller's own write.
_CHECK_COMPLETE = """
local total = redis.call('HGET', KEYS[1], ARGV[1])
if not total then return 0 end
total = tonumber(total)
for i = 3, #KEYS, 2 do
  local n = redis.call('HLEN', KEYS[i])
  for _, id in ipairs(redis.call('HKEYS', KEYS[i + 1])) do
    if redis.call('HEXISTS', KEYS[i], id) == 0 then n = n + 1 end
  end
  if n < total then return 0 end
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX') then
  redis.call('HSET', KEYS[1], 'status', ARGV[2])
  return 1
end
if redis.call('GET', KEYS[2]) == ARGV[3] then return 1 end
return 0
"""


# Records a finished unit (KEYS: done, failed, state, figures, latencies, sizes); the
# first time its id is seen, adds its items to its counter (ARGV[4]) and, unless a resume
# found it done in the store (no figures), its figures to the stage's running figures:
# sums, first start, last finish, peak memory, each worker's latest budget per model,
# and bounded samples of the latest latencies and model batch sizes. The live view
# reads those, so a poll costs the same at 10 units or 10 million. ARGV[2] is the
# BatchReport as msgpack, which Redis's Lua reads as a table.
_RECORD_DONE = """
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[3], ARGV[4], ARGV[3])
  local r = cmsgpack.unpack(ARGV[2])
  if not r.recovered then
    local f = KEYS[4]
    local function num(x) return string.format('%.6f', x) end
    local function add(field, value) redis.call('HINCRBY', f, field, value or 0) end
    add('units', 1)
    add('items', r.chunks)
    add('tokens', r.tokens)
    add('oom_count', r.oom_count)
    add('items_missed', r.items_missed)
    add('items_reused', r.items_reused)
    add('model_loads', r.model_loads)
    add('hydrations', r.hydrations)
    add('evictions', r.evictions)
    local latency = r.finished_at - r.started_at
    redis.call('HINCRBYFLOAT', f, 'latency_sum', num(latency))
    local first = tonumber(redis.call('HGET', f, 'started_min'))
    if not first or r.started_at < first then
      redis.call('HSET', f, 'started_min', num(r.started_at))
    end
    local last = tonumber(redis.call('HGET', f, 'finished_max'))
    if not last or r.finished_at > last then
      redis.call('HSET', f, 'finished_max', num(r.finished_at))
    end
    local peak = tonumber(redis.call('HGET', f, 'peak_memory_bytes'))
    if not peak or (r.peak_memory_bytes or 0) > peak then
      redis.call('HSET', f, 'peak_memory_bytes', r.peak_memory_bytes or 0,
                 'peak_memory_kind', r.peak_memory_kind or '')
    end
    if r.device and r.device ~= '' then redis.call('HSET', f, 'device:' .. r.device, 1) end
    for model, budget in pairs(r.budgets or {}) do
      local key = 'budget:' .. model .. '@' .. r.worker
      local at = tonumber(redis.call('HGET', f, key .. ':at'))
      if not at or at < r.finished_at then
        redis.call('HSET', f, key, budget, key .. ':at', num(r.finished_at))
      end
    end
    for _, size in ipairs(r.batch_sizes or {}) do
      local low = tonumber(redis.call('HGET', f, 'size_min'))
      if not low or size < low then redis.call('HSET', f, 'size_min', size) end
      local high = tonumber(redis.call('HGET', f, 'size_max'))
      if not high or size > high then redis.call('HSET', f, 'size_max', size) end
      redis.call('LPUSH', KEYS[6], size)
    end
    redis.call('LTRIM', KEYS[6], 0, tonumber(ARGV[5]) - 1)
    redis.call('LPUSH', KEYS[5], num(latency))
    redis.call('LTRIM', KEYS[5], 0, tonumber(ARGV[5]) - 1)
  end
end
redis.call('HDEL', KEYS[2], ARGV[1])
return 0
"""

# How many of a stage's latest unit latencies (and model batch sizes) the running
# figures keep for their percentiles.
FIGURES_SAMPLE = 1024


# Records a staged batch (KEYS: staged, state, staged-ids); counts it only the first time
# its id is seen, so a producer that stages again after a resume counts nothing twice.
_RECORD_STAGED = """
if redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'staged_batches', 1)
  redis.call('HINCRBY', KEYS[2], 'staged_chunks', ARGV[2])
end
if tonumber(ARGV[3]) >= 0 then
  redis.call('HSET', KEYS[2], 'documents_read', ARGV[3], 'bytes_read', ARGV[4])
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[5]) end
return 0
"""


# Claims chunk texts (KEYS: texts; ARGV[1]: how many texts the hash may hold; then a
# text key and a chunk's place, in turn). A text another place holds is that place's;
# a text no place holds is the caller's, and the hash keeps it unless it is full; a
# place that finds itself (its unit run again) is its own. Returns, per text, the other
# place or ''.
_CLAIM_TEXTS = """
local cap = tonumber(ARGV[1])
local size = redis.call('HLEN', KEYS[1])
local out = {}
for i = 2, #ARGV, 2 do
  local place = ARGV[i + 1]
  local held = redis.call('HGET', KEYS[1], ARGV[i])
  if held and held ~= place then
    out[#out + 1] = held
  else
    if not held and size < cap then
      size = size + 1
      redis.call('HSET', KEYS[1], ARGV[i], place)
    end
    out[#out + 1] = ''
  end
end
return out
"""


# Adds a chunked range's documents and bytes to the figures read (KEYS: ranges-read,
# state), the first time the range is seen only.
_RECORD_RANGE_READ = """
if redis.call('HSET', KEYS[1], ARGV[1], 1) == 1 then
  redis.call('HINCRBY', KEYS[2], 'documents_read', ARGV[2])
  redis.call('HINCRBY', KEYS[2], 'bytes_read', ARGV[3])
end
return 0
"""


# Counts a delivery of a unit (KEYS: deliveries; ARGV[1]: the unit, ARGV[2]: the deaths
# in a row that fail it) unless its worker already died that many times in a row on it.
# Deaths are the deliveries started since the last that ended by itself; the cause the
# main process recorded of the last one goes, as this delivery supersedes it. Returns
# {deaths, last cause, counted}.
_START_TRY = """
local unit = ARGV[1]
local tries = tonumber(redis.call('HGET', KEYS[1], unit) or 0)
local ended = tonumber(redis.call('HGET', KEYS[1], unit .. ':ended') or 0)
local deaths = math.max(tries - ended, 0)
local last = redis.call('HGET', KEYS[1], unit .. ':death') or ''
if deaths >= tonumber(ARGV[2]) then return {deaths, last, 0} end
redis.call('HINCRBY', KEYS[1], unit, 1)
redis.call('HDEL', KEYS[1], unit .. ':death')
return {deaths, last, 1}
"""

# A delivery of a unit ended by itself (KEYS: deliveries; ARGV[1]: the unit): every
# delivery started so far is accounted for, so the deaths in a row start again from 0.
_END_TRY = """
local tries = redis.call('HGET', KEYS[1], ARGV[1])
if tries then redis.call('HSET', KEYS[1], ARGV[1] .. ':ended', tries) end
return 0
"""

# The deliveries of an aggregator step are counted under this name in place of a stage.
STEP_DELIVERIES = "step"


@dataclass(frozen=True)
class TryStart:
    """What the ledger said when a delivery of a unit started.

    Attributes:
        deaths: The deliveries before this one that never ended by themselves (their
            worker process died: killed by the kernel, out of memory, a crash in native
            code), in a row.
        last_death: How the last of those died, as the worker's main process saw it
            (``signal 9 (SIGKILL)``, ``exit code 1``); ``""`` when no main process said
            (the whole worker died, or Redis could not be reached).
        counted: Whether this delivery was counted; ``False`` when ``deaths`` reached
            the limit the caller gave, and the caller fails the unit instead of running it.
    """

    deaths: int
    last_death: str
    counted: bool


# Backoff between retries of a Redis call that could not connect: doubling from
# RETRY_FIRST_S up to RETRY_CAP_S.
RETRY_FIRST_S, RETRY_CAP_S = 0.25, 5.0


def retries_for(window_s: float) -> int:
    """How many retries, backing off from RETRY_FIRST_S to RETRY_CAP_S, span ``window_s``."""
    retries, spent, delay = 0, 0.0, RETRY_FIRST_S
    while spent < window_s:
        spent += delay
        delay = min(delay * 2, RETRY_CAP_S)
        retries += 1
    return retries


def connect(url: str, transient_window_s: float = 0.0) -> redis.Redis:
    """Connect to Redis and check it answers, with an error that says what to do.

    Args:
        url: The broker's URL (credentials are never printed).
        transient_window_s: How long a call of the returned client keeps retrying when
            Redis cannot be reached (a restart, a blip), backing off up to 5 s between
            tries, before the error is raised. The first check does not wait: a Redis
            that is not there at all is reported at once.
    """
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    try:
        check = redis_client(url, socket_connect_timeout=3, socket_timeout=10)
        check.ping()
        check.close()
    except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
        # Before ConnectionError: redis-py makes AuthenticationError one of those.
        given = bool(urlsplit(url).password)
        what = "refused the credentials" if given else "wants credentials and REDIS_URL has none"
        raise EmbedFleetError(
            f"Redis at {redact_url(url)} {what} ({type(exc).__name__})",
            "Check the user and password in REDIS_URL (redis://USER:PASSWORD@HOST:PORT/DB)",
        ) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        if _tls_refused(exc):
            raise EmbedFleetError(
                f"Redis at {redact_url(url)} refused the TLS handshake: {exc}",
                "Give REDIS_URL the CA that signed Redis's certificate, and a client "
                "certificate if Redis asks for one: rediss://HOST:PORT/DB?ssl_cert_reqs="
                "required&ssl_ca_certs=/path/ca.pem[&ssl_certfile=/path/client.pem"
                "&ssl_keyfile=/path/client.key]",
            ) from None
        raise EmbedFleetError(
            f"cannot reach Redis at {redact_url(url)}: {exc}",
            "Start Redis there, fix REDIS_URL, or unset REDIS_URL and CELERY_BROKER_URL "
            "to run the embedded local fleet",
        ) from None
    return redis_client(
        url,
        socket_connect_timeout=3,
        socket_timeout=10,
        health_check_interval=30,
        retry=Retry(
            ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_FIRST_S),
            retries_for(transient_window_s),
        ),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def _tls_refused(exc: BaseException) -> bool:
    """Whether a connection failed in its TLS handshake (an unknown CA, a certificate
    Redis wanted and did not get), not because nothing answered."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "SSL" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _failed_try_ooms_field(stage: str) -> str:
    """The state field counting a stage's out-of-memory errors of failed tries."""
    return f"ooms_of_failed_tries:{stage}"


def _delivery_fields(units: list[str]) -> list[str]:
    """The fields of the units' deliveries (see ``_START_TRY``)."""
    return [f"{unit}{part}" for unit in units for part in ("", ":ended", ":death")]


def _counter(report: BatchReport) -> str:
    """The state field a finished unit's items are counted in."""
    return f"{'queries' if report.kind == 'queries' else 'chunks'}_done:{report.stage}"


def _claimant(unit: BatchReport | BatchFailure) -> str:
    """Who takes a phase guard when recording this unit: the unit itself."""
    return f"unit:{unit.stage}:{unit.batch_id}"


def _running_figures(
    figures: dict[bytes, bytes], latencies: list[bytes], sizes: list[bytes]
) -> LatencySummary:
    """A stage's live figures from its running sums and samples (see ``_RECORD_DONE``):
    the same fields ``LatencySummary.from_reports`` gives from every report, with the
    percentiles taken over the latest units."""
    f = {_text(k): _text(v) for k, v in figures.items()}
    units = int(f.get("units", 0))
    if not units:
        return LatencySummary.from_samples([], 0, 0.0)
    span = float(f["finished_max"]) - float(f["started_min"])
    items = int(f["items"])
    summary = LatencySummary.from_samples(
        [float(x) for x in latencies], items, span, [int(x) for x in sizes]
    )
    summary.batches = units
    summary.mean_s = round(float(f["latency_sum"]) / units, 4)
    summary.batch_size_min = int(f.get("size_min", 0))
    summary.batch_size_max = int(f.get("size_max", 0))
    summary.tokens = int(f["tokens"])
    summary.tokens_per_s = round(summary.tokens / span, 1) if span > 0 else 0.0
    summary.peak_memory_bytes = int(f.get("peak_memory_bytes", 0))
    summary.peak_memory_kind = f.get("peak_memory_kind", "")
    summary.oom_count = int(f["oom_count"])
    summary.items_reused = int(f.get("items_reused", 0))
    budgets: dict[str, int] = {}
    for key, value in f.items():
        if key.startswith("budget:") and not key.endswith(":at"):
            model = key[len("budget:") :].rsplit("@", 1)[0]
            budgets[model] = min(int(value), budgets.get(model, int(value)))
    summary.budgets = budgets
    summary.devices = sorted(k[len("device:") :] for k in f if k.startswith("device:"))
    missed = int(f["items_missed"])
    summary.coverage = round(1 - missed / items, 4) if items else 1.0
    summary.model_loads = int(f["model_loads"])
    summary.hydrations = int(f["hydrations"])
    summary.evictions = int(f["evictions"])
    return summary


def _decode(data: Any, kind: type[T]) -> T | None:
    return None if data is None else msgspec.msgpack.decode(data, type=kind)


def _text(value: Any) -> str:
    """redis-py returns bytes (this client does not decode responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class JobLedger:
    """One job's ledger. Cheap to build; every method is one or two round trips."""

    def __init__(self, client: redis.Redis, job_id: str, spec: JobSpec | None = None) -> None:
        self.client = client
        self.job_id = job_id
        base = f"{PREFIX}:job:{job_id}"
        self.k_spec = f"{base}:spec"
        self.k_state = f"{base}:state"
        self.k_staged = f"{base}:staged"
        self.k_staged_queries = f"{base}:staged-queries"
        self.k_staged_ids = f"{base}:staged-ids"
        self.k_models = f"{base}:models"
        self.k_producer = f"{base}:producer"
        self.k_ranges_read = f"{base}:ranges-read"
        self.k_texts = f"{base}:texts"
        self._check = client.register_script(_CHECK_COMPLETE)
        self._record_done = client.register_script(_RECORD_DONE)
        self._record_staged = client.register_script(_RECORD_STAGED)
        self._record_range_read = client.register_script(_RECORD_RANGE_READ)
        self._start_try = client.register_script(_START_TRY)
        self._end_try = client.register_script(_END_TRY)
        self._claim_texts = client.register_script(_CLAIM_TEXTS)
        self._spec = spec

    def k_done(self, stage: str) -> str:
        return f"{PREFIX}:job:{self.job_id}:done:{stage}"

    def k_figures(self, stage: str) -> tuple[str, str, str]:
        """A stage's running figures: the sums hash, the latency and batch-size samples."""
        base = f"{PREFIX}:job:{self.job_id}"
        return f"{base}:figures:{stage}", f"{base}:latencies:{stage}", f"{base}:sizes:{stage}"

    def k_failed(self, stage: str) -> str:
        return f"{PREFIX}:job:{self.job_id}:failed:{stage}"

    def k_guard(self, phase: PhaseName) -> str:
        return f"{PREFIX}:job:{self.job_id}:guard:{phase}"

    def k_deliveries(self, stage: str) -> str:
        """A stage's deliveries (``""``: the aggregator steps')."""
        return f"{PREFIX}:job:{self.job_id}:deliveries:{stage or STEP_DELIVERIES}"

    # --- producer side ---------------------------------------------------------------

    def open(self, spec: JobSpec, documents_total: int, bytes_total: int, ranges: int = 0) -> None:
        """A new job; ``ranges``: the read ranges of a job the fleet prepares (its first
        phase's units, which the producer enqueues next)."""
        pipe = self.client.pipeline()
        pipe.set(self.k_spec, msgspec.msgpack.encode(spec))
        if spec.prepare_on == "fleet":
            first = pipeline.phase("validate")
            pipe.hset(self.k_state, mapping={first.total_field: ranges, "status": first.status})
        else:
            pipe.hset(self.k_state, "status", pipeline.phase("encode").status)
        pipe.hset(
            self.k_state,
            mapping={
                "staged_batches": 0,
                "staged_chunks": 0,
                "documents_total": documents_total,
                "documents_read": 0,
                "bytes_read": 0,
                "bytes_total": bytes_total,
            },
        )
        pipe.zadd(JOBS_INDEX, {self.job_id: spec.created_at})
        pipe.execute()

    def record_staged(
        self,
        batch_id: str,
        chunks: int,
        documents_read: int,
        bytes_read: int,
        chunk_ids: list[str] | None = None,
    ) -> None:
        """A staged batch, with its chunk ids (compressed), so that a batch whose staged
        object is lost can still be reported chunk by chunk. Counted once per id."""
        ids = zlib.compress("\n".join(chunk_ids).encode()) if chunk_ids else b""
        self._record_staged(
            keys=[self.k_staged, self.k_state, self.k_staged_ids],
            args=[batch_id, chunks, documents_read, bytes_read, ids],
        )

    def record_range_read(self, range_id: str, documents: int, bytes_read: int) -> None:
        """A read range is chunked: its documents and bytes join the job's figures read
        (once per range, however often its unit runs)."""
        self._record_range_read(
            keys=[self.k_ranges_read, self.k_state], args=[range_id, documents, bytes_read]
        )

    def claim_texts(self, keys: list[str], places: list[str], cap: int) -> list[str]:
        """For each chunk (its text key in hex, and its place ``<batch id>:<row>``): the
        place of the chunk that claimed the same text first, or ``""`` where this chunk
        is that first one (its text is claimed for it while the hash holds fewer than
        ``cap`` texts). One round trip, atomic: of two ranges chunking the same text at
        once, exactly one claims it."""
        if not keys:
            return []
        args: list[bytes | str | int] = [cap]
        for key, place in zip(keys, places, strict=True):
            args += [bytes.fromhex(key), place]  # 16 bytes, not 32 hex digits
        found = self._claim_texts(keys=[self.k_texts], args=args)
        return [_text(place) for place in found]

    def forget_texts(self) -> None:
        """The chunk phase is over: nothing claims a text again, so the claims go."""
        self.client.unlink(self.k_texts)

    def set_documents_total(self, documents: int) -> None:
        """How many documents the collection holds, once every range is validated."""
        self.client.hset(self.k_state, "documents_total", documents)

    def record_staged_queries(self, batch_id: str, queries: int) -> None:
        self.client.hset(self.k_staged_queries, batch_id, queries)

    def rebuild(
        self,
        record: JobRecord,
        producer: ProducerReport | None,
        documents: dict[str, int],
        queries: dict[str, int],
        models: list[ModelInfo],
        state_extra: dict[str, int] | None = None,
    ) -> None:
        """Write the ledger again from the job's object store (see
        ``producer.recovery``): the spec, the staged batches (id -> items), the
        producer's report if it finished, the models. Whatever was left of the old
        ledger goes first. Status ``resuming``: the resume step records the units whose
        outputs are there and enqueues the others."""
        stale = list(self.client.scan_iter(match=f"{PREFIX}:job:{self.job_id}:*", count=1000))
        pipe = self.client.pipeline()
        if stale:
            pipe.delete(*stale)
        pipe.set(self.k_spec, msgspec.msgpack.encode(record.spec))
        state: dict[str, str | int | float] = {
            "status": "resuming",
            "staged_batches": len(documents),
            "staged_chunks": sum(documents.values()),
            "documents_total": record.documents_total,
            "bytes_total": record.bytes_total,
            "documents_read": producer.documents if producer else 0,
            "bytes_read": record.bytes_total if producer else 0,
            "rebuilt_at": time.time(),
            **(state_extra or {}),
        }
        if producer is not None:
            pipe.set(self.k_producer, msgspec.msgpack.encode(producer))
            state["total_batches"] = producer.batches + producer.query_batches
        pipe.hset(self.k_state, mapping=state)  # type: ignore[arg-type]
        if documents:
            pipe.hset(self.k_staged, mapping=documents)  # type: ignore[arg-type]
        if queries:
            pipe.hset(self.k_staged_queries, mapping=queries)  # type: ignore[arg-type]
        for info in models:
            pipe.hset(self.k_models, info.name, msgspec.msgpack.encode(info))
        pipe.zadd(JOBS_INDEX, {self.job_id: record.spec.created_at})
        pipe.execute()

    def record_read(self, documents_read: int, bytes_read: int) -> None:
        self.client.hset(
            self.k_state, mapping={"documents_read": documents_read, "bytes_read": bytes_read}
        )

    def seal(self, report: ProducerReport, check: bool = True, claimant: str = "producer") -> bool:
        """Record that every batch (documents and queries) is staged. True if the caller
        must start the next phase (every batch was already done); ``check=False``: a
        resume's producer, whose job the resume step re-drives, does not look."""
        pipe = self.client.pipeline()
        pipe.set(self.k_producer, msgspec.msgpack.encode(report))
        pipe.hset(self.k_state, "total_batches", report.batches + report.query_batches)
        pipe.execute()
        return self.check_phase("encode", claimant) if check else False

    def was_rebuilt(self) -> bool:
        """Whether this ledger was written again from the object store (Redis lost it)."""
        return bool(self.client.hexists(self.k_state, "rebuilt_at"))

    def claim_ordinals(self, stage: str, count: int = 1) -> int:
        """The place in its job of the first of ``count`` units of ``stage`` about to be
        sent (from 0; the next call's first is this one's plus ``count``): what their
        priority level follows (``shared.control.fairness``)."""
        return int(self.client.hincrby(self.k_state, f"sent:{stage}", count)) - count

    def open_phase(self, phase: PhaseName, units: int) -> bool:
        """Set how many units ``phase`` has (before they are enqueued) and the status
        while they run. True if the caller (the step that plans ``phase``) must start
        the next phase at once (a phase without units)."""
        opened = pipeline.phase(phase)
        if units == 0:
            self.client.hset(self.k_state, opened.total_field, 0)
            return self.check_phase(phase, f"step:{opened.name}")
        self.client.hset(self.k_state, mapping={opened.total_field: units, "status": opened.status})
        return False

    # --- worker side -----------------------------------------------------------------

    def record_done(self, report: BatchReport, claimant: str = "") -> bool:
        """Record a finished unit. True if the caller must start the next phase."""
        return self.record_done_many([report], claimant=claimant)

    def record_done_many(
        self,
        reports: list[BatchReport],
        models: list[ModelInfo] | None = None,
        claimant: str = "",
    ) -> bool:
        """Record the finished units of one message (one, or each staged batch of an
        encode unit), and the models it used, in one round trip with the phase check.
        True if the caller must start the next phase.

        ``claimant`` is who takes the phase guard: the message's delivery (a worker
        passes its Celery task id, which a redelivery of the same message keeps), so
        that another copy of the same unit (a resume's, the rest of an encode unit
        sent again by a worker that outlived a lost Redis) never starts the next phase
        a second time. Default: the first report's unit."""
        first = reports[0]
        pipe = self.client.pipeline(transaction=False)
        for report in reports:
            self._run_record_done(report, pipe)
        for info in models or []:
            # Every time: the ledger may have been rebuilt since this worker last said.
            pipe.hset(self.k_models, info.name, msgspec.msgpack.encode(info))
        phase = pipeline.stage(first.stage).phase
        self._check_phase(phase, claimant or _claimant(first), pipe)
        return bool(pipe.execute()[-1])

    def _run_record_done(self, report: BatchReport, client: Any = None) -> None:
        """The record-done script for one unit (in ``client``, a pipeline, if given)."""
        self._record_done(
            keys=[
                self.k_done(report.stage),
                self.k_failed(report.stage),
                self.k_state,
                *self.k_figures(report.stage),
            ],
            args=[
                report.batch_id,
                msgspec.msgpack.encode(report),
                report.chunks,
                _counter(report),
                FIGURES_SAMPLE,
            ],
            client=client,
        )

    def record_recovered(self, reports: list[BatchReport]) -> None:
        """Units a resume found done in the object store, recorded as done (counted once,
        as every unit is). The caller checks the phase afterwards."""
        pipe = self.client.pipeline()
        for report in reports:
            self._run_record_done(report, pipe)
        pipe.execute()

    def done_units(self, stage: str) -> set[str]:
        return {_text(unit) for unit in self.client.hkeys(self.k_done(stage))}

    def record_failed(self, failure: BatchFailure, claimant: str = "") -> bool:
        """Record a unit that kept failing. True if the caller must start the next phase
        (``claimant``: as for :meth:`record_done_many`)."""
        if not self.client.hexists(self.k_done(failure.stage), failure.batch_id):
            self.client.hset(
                self.k_failed(failure.stage), failure.batch_id, msgspec.msgpack.encode(failure)
            )
        phase = pipeline.stage(failure.stage).phase
        return self.check_phase(phase, claimant or _claimant(failure))

    def record_failed_try_ooms(self, stage: str, count: int) -> None:
        """Out-of-memory errors of a try of a unit that then raised (and is retried, or
        given up): no report carries them, so the stage's figures add these."""
        self.client.hincrby(self.k_state, _failed_try_ooms_field(stage), count)

    def failed_try_ooms(self, stage: str) -> int:
        raw = self.client.hget(self.k_state, _failed_try_ooms_field(stage))
        return int(raw) if raw else 0

    def start_try(self, stage: str, unit: str, max_deaths: int) -> TryStart:
        """Count a delivery of a unit (``stage`` ``""``: an aggregator step) as it
        starts, unless its worker died on it ``max_deaths`` times in a row: then nothing
        is counted and the caller records the unit as failed, so that no worker dies on
        it again. A delivery that ends by itself, done or raising (Celery's retries send
        a new one), says so with :meth:`end_try`; one that never does is a death."""
        deaths, last, counted = self._start_try(
            keys=[self.k_deliveries(stage)], args=[unit, max_deaths]
        )
        return TryStart(int(deaths), _text(last), bool(counted))

    def end_try(self, stage: str, unit: str) -> None:
        """The delivery of a unit in hand ended by itself (done, raised, or handed back
        by a stopping worker): its worker did not die on it."""
        self._end_try(keys=[self.k_deliveries(stage)], args=[unit])

    def record_death(self, stage: str, unit: str, cause: str) -> None:
        """How the worker process running a delivery of a unit died (``signal 9
        (SIGKILL)``), recorded by the worker's main process, so that the next delivery
        can name it."""
        self.client.hset(self.k_deliveries(stage), f"{unit}:death", cause)

    def forget_tries(self, stage: str, units: list[str]) -> None:
        """The units are sent afresh (a resume, a unit of several batches sent again
        one batch at a time): their deliveries count from 0 again."""
        if units:
            self.client.hdel(self.k_deliveries(stage), *_delivery_fields(units))

    def deliveries(self, stage: str, unit: str) -> tuple[int, int]:
        """A unit's deliveries started, and the deaths in a row among them (the
        deliveries since the last that ended by itself, one in hand included)."""
        tries, ended = self.client.hmget(self.k_deliveries(stage), [unit, f"{unit}:ended"])
        started = int(tries or 0)
        return started, max(started - int(ended or 0), 0)

    def record_model(self, info: ModelInfo) -> None:
        self.client.hset(self.k_models, info.name, msgspec.msgpack.encode(info))

    def set_status(self, status: JobStatus) -> None:
        self.client.hset(self.k_state, "status", status)

    def check_phase(self, phase: PhaseName, claimant: str = "") -> bool:
        """True for the caller that finds ``phase`` complete first, and again for that
        same claimant only (a unit or step redelivered after its worker died before it
        published the next step; publishing it twice is harmless, never publishing it
        would stall the job). An empty claimant never gets it twice."""
        return bool(self._check_phase(phase, claimant))

    def _check_phase(self, phase: PhaseName, claimant: str, client: Any = None) -> Any:
        """The phase check's script (in ``client``, a pipeline, if given)."""
        spec = self.spec()
        keys = [self.k_state, self.k_guard(phase)]
        for stage in pipeline.job_stages(spec, phase):
            keys += [self.k_done(stage.name), self.k_failed(stage.name)]
        after = pipeline.next_step(spec, phase)
        total = pipeline.phase(phase).total_field
        claimant = claimant or f"anonymous:{secrets.token_hex(8)}"
        return self._check(keys=keys, args=[total, after.status, claimant], client=client)

    def spec(self) -> JobSpec:
        """The job's spec: the one this ledger was made with (a worker's, which keeps the
        specs of its recent jobs: a spec never changes once a job is open), else read
        from Redis, which raises if the job is not there (how a producer following its
        job learns that Redis lost it)."""
        return self._spec or self._read_spec()

    # --- resuming --------------------------------------------------------------------

    def phase_opened(self, phase: PhaseName) -> bool:
        """Whether ``phase``'s units were planned (its total is set; for ``encode``: the
        producer staged every batch)."""
        return bool(self.client.hexists(self.k_state, pipeline.phase(phase).total_field))

    def require_submitted(self) -> None:
        """Raise unless the producer staged every batch: only then can a job be
        re-driven (resume, the watchdog)."""
        if not self.phase_opened("encode"):
            raise EmbedFleetError(
                f"job {self.job_id} was never fully submitted (its producer stopped while staging)",
                f"Run `embed-collections resume {self.job_id}` where the job's source is: it "
                "stages the rest",
            )

    def mark_resuming(self) -> None:
        """Status ``resuming`` until the aggregator re-drives the job; the job's keys
        lose the expiry a finished job has."""
        pipe = self.client.pipeline()
        pipe.hset(self.k_state, "status", "resuming")
        pipe.hdel(self.k_state, "error", "finished_at")
        for key in self._all_keys():
            pipe.persist(key)
        pipe.execute()

    def reopen(
        self, phase: PhaseName, missing: dict[str, list[str]], later: list[PhaseName]
    ) -> None:
        """Make ``phase`` wait again for the ``missing`` units (stage -> unit ids) and
        forget every ``later`` phase, so it is planned again when ``phase`` completes
        (see ``workers.aggregate.resume``). A missing unit that was recorded done (its
        output was lost) is uncounted."""
        spec = self.spec()
        pipe = self.client.pipeline()
        for stage, units in missing.items():
            reports = self.client.hmget(self.k_done(stage), units) if units else []
            for raw in reports:
                report = _decode(raw, BatchReport) if raw else None
                if report is not None:
                    pipe.hincrby(self.k_state, _counter(report), -report.chunks)
            if units:
                pipe.hdel(self.k_done(stage), *units)
                pipe.hdel(self.k_failed(stage), *units)
                # Sent afresh: a unit failed because its worker kept dying runs again.
                pipe.hdel(self.k_deliveries(stage), *_delivery_fields(units))
        for name in later:
            # A phase fed early (encode) keeps what its units recorded: they were sent by
            # the phase re-driven now, not by a step that plans them again.
            stages = [] if pipeline.phase(name).fed_early else pipeline.job_stages(spec, name)
            for gone in stages:
                pipe.delete(
                    self.k_done(gone.name),
                    self.k_failed(gone.name),
                    self.k_deliveries(gone.name),
                    *self.k_figures(gone.name),
                )
                pipe.hdel(self.k_state, f"chunks_done:{gone.name}", f"queries_done:{gone.name}")
            pipe.delete(self.k_guard(name))
            pipe.hdel(self.k_state, pipeline.phase(name).total_field)
        pipe.delete(self.k_guard(phase), self.k_deliveries(""))
        pipe.hset(self.k_state, "status", pipeline.phase(phase).status)
        pipe.execute()

    def record_resume(self, summary: str) -> None:
        """How many times the job was resumed, and what the last resume re-drove."""
        pipe = self.client.pipeline()
        pipe.hincrby(self.k_state, "resumes", 1)
        pipe.hset(self.k_state, "last_resume", summary)
        pipe.execute()

    # --- aggregator side -----------------------------------------------------------

    def finish(
        self, status: JobStatus, ttl: float, error: str = "", bad_input: bool = False
    ) -> None:
        """The job's end (``bad_input``: it failed on its input, e.g. a bad record under
        ``--on-bad-record fail``; the CLI exits 2 for it, as for input it checks itself)."""
        pipe = self.client.pipeline()
        pipe.hset(
            self.k_state,
            mapping={
                "status": status,
                "error": error,
                "finished_at": time.time(),
                "bad_input": int(bad_input),
            },
        )
        for key in self._all_keys():
            pipe.expire(key, int(ttl))
        pipe.execute()
        spec = self.spec()
        if spec.max_in_flight:
            # Nothing will run a parked unit of a job that ended.
            self.quota().clear([stage.name for stage in pipeline.job_stages(spec)])

    def quota(self) -> JobQuota:
        """The job's quota of units in flight (``run --max-in-flight``)."""
        base = f"{PREFIX}:job:{self.job_id}"
        return JobQuota(self.client, base, PARKED_INDEX, self.spec().max_in_flight)

    def _all_keys(self) -> list[str]:
        spec = self.spec()
        keys = [
            self.k_spec,
            self.k_state,
            self.k_staged,
            self.k_staged_queries,
            self.k_staged_ids,
            self.k_models,
            self.k_producer,
            self.k_ranges_read,
            self.k_texts,
        ]
        keys += [self.k_guard(phase.name) for phase in pipeline.PHASES]
        keys.append(self.k_deliveries(""))
        for stage in pipeline.job_stages(spec):
            keys += [self.k_done(stage.name), self.k_failed(stage.name)]
            keys.append(self.k_deliveries(stage.name))
            keys += self.k_figures(stage.name)
        return keys

    # --- readers ---------------------------------------------------------------------

    def exists(self) -> bool:
        return bool(self.client.exists(self.k_spec))

    def _read_spec(self) -> JobSpec:
        spec = _decode(self.client.get(self.k_spec), JobSpec)
        if spec is None:
            raise EmbedFleetError(
                f"no job {self.job_id!r} in the ledger",
                "Check the job id (`embed-collections status` lists recent jobs); finished "
                "jobs expire from Redis after EMBED_FLEET_LEDGER_TTL seconds. If Redis lost "
                "its data, `embed-collections resume JOB_ID --output URL` rebuilds the job "
                "from its object store",
            )
        return spec

    def status(self) -> str:
        raw = self.client.hget(self.k_state, "status")
        return _text(raw) if raw else "unknown"

    def staged_batches(self) -> list[str]:
        """Staged document batch ids in staging order (zero-padded sequence numbers)."""
        return sorted(_text(field) for field in self.client.hkeys(self.k_staged))

    def staged_chunk_ids(self, batch_id: str) -> list[str]:
        """The chunk ids a staged document batch held ([] if not recorded)."""
        raw: bytes | None = self.client.hget(self.k_staged_ids, batch_id)  # type: ignore[assignment]
        return zlib.decompress(raw).decode().split("\n") if raw else []

    def staged_items(self) -> dict[str, int]:
        """Every staged batch (documents and queries) -> its chunks or queries."""
        pipe = self.client.pipeline()
        pipe.hgetall(self.k_staged)
        pipe.hgetall(self.k_staged_queries)
        return {_text(k): int(v) for found in pipe.execute() for k, v in found.items()}

    def staged_query_batches(self) -> list[str]:
        return sorted(_text(field) for field in self.client.hkeys(self.k_staged_queries))

    def reports(self, stage: str) -> list[BatchReport]:
        return self._values(self.k_done(stage), BatchReport)

    def failures(self, stage: str) -> list[BatchFailure]:
        done = {_text(f) for f in self.client.hkeys(self.k_done(stage))}
        return [
            f for f in self._values(self.k_failed(stage), BatchFailure) if f.batch_id not in done
        ]

    def failed_batches(self) -> set[str]:
        """Staged batches that failed any encode stage: the job leaves them out whole
        (no retrieval over them, no export of them), so its artifacts agree."""
        stages = self.spec().stages
        return {failure.batch_id for stage in stages for failure in self.failures(stage)}

    def usable_batches(self) -> list[str]:
        """The document batches the job searches and exports: every staged one that no
        encode stage failed."""
        failed = self.failed_batches()
        return [b for b in self.staged_batches() if b not in failed]

    def models(self) -> list[ModelInfo]:
        return self._values(self.k_models, ModelInfo)

    def producer_report(self) -> ProducerReport | None:
        return _decode(self.client.get(self.k_producer), ProducerReport)

    def _values(self, key: str, kind: type[T]) -> list[T]:
        raw: dict[bytes, bytes] = self.client.hgetall(key)  # type: ignore[assignment]
        return [msgspec.msgpack.decode(raw[k], type=kind) for k in sorted(raw)]

    def progress(self, detail: bool = False) -> JobProgress:
        """A snapshot of the job; with ``detail``, each stage's live figures
        (throughput, latency percentiles, batch sizes, peak memory, coverage), summed
        from the units recorded so far."""
        spec = self.spec()
        pipe = self.client.pipeline()
        pipe.hgetall(self.k_state)
        names = [stage.name for stage in pipeline.job_stages(spec)]
        for name in names:
            pipe.hlen(self.k_done(name))
            pipe.hlen(self.k_failed(name))
        if detail:
            for name in names:
                figures, latencies, sizes = self.k_figures(name)
                pipe.hgetall(figures)
                pipe.lrange(latencies, 0, -1)
                pipe.lrange(sizes, 0, -1)
        results: list[Any] = pipe.execute()
        state = {_text(k): _text(v) for k, v in results[0].items()}
        total = state.get("total_batches")
        stages = []
        for i, name in enumerate(names):
            stage_total = state.get(pipeline.phase(pipeline.stage(name).phase).total_field)
            summary = None
            if detail:
                at = 1 + 2 * len(names) + 3 * i
                summary = _running_figures(results[at], results[at + 1], results[at + 2])
                summary.oom_count += int(state.get(_failed_try_ooms_field(name), 0))
            stages.append(
                StageProgress(
                    stage=name,
                    batches_done=int(results[1 + 2 * i]),
                    batches_failed=int(results[2 + 2 * i]),
                    chunks_done=int(state.get(f"chunks_done:{name}", 0)),
                    queries_done=int(state.get(f"queries_done:{name}", 0)),
                    total=int(stage_total) if stage_total is not None else None,
                    summary=summary,
                )
            )
        return JobProgress(
            job_id=self.job_id,
            status=state.get("status", "running"),  # type: ignore[arg-type]
            collection=spec.collection,
            staged_batches=int(state.get("staged_batches", 0)),
            staged_chunks=int(state.get("staged_chunks", 0)),
            total_batches=int(total) if total is not None else None,
            documents_total=int(state.get("documents_total", 0)),
            documents_read=int(state.get("documents_read", 0)),
            bytes_read=int(state.get("bytes_read", 0)),
            bytes_total=int(state.get("bytes_total", 0)),
            stages=stages,
            error=state.get("error", ""),
            bad_input=state.get("bad_input") == "1",
        )

    def fail(self, error: str, ttl: float, bad_input: bool = False) -> None:
        """Mark the job failed (the producer could not finish staging it, a unit gave
        up, or the fleet found its input bad)."""
        self.finish("failed", ttl, error, bad_input)


def recent_jobs(client: redis.Redis, limit: int = 20) -> list[str]:
    return [_text(j) for j in client.zrevrange(JOBS_INDEX, 0, limit - 1)]

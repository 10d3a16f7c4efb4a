"""How many of a job's units the fleet runs at once: ``run --max-in-flight N``.

Priority levels (:mod:`shared.control.fairness`) decide which unit a free worker takes
next; they do not stop one job from holding every worker of a stage when it is the only
one with work, or when its units were queued first. A quota does: at most ``N`` units
of the job run at once on each stage (``N`` dense units, ``N`` sparse units, ...).

There is no dispatcher. Every unit is published as usual, so the queue counts it and
its place is its priority level's. A worker that takes a unit asks the job's quota,
in one atomic step:

- **admitted** when fewer than ``N`` of the job's units of that stage run (or this unit
  is already among them: a redelivery of a unit whose worker died);
- **parked** otherwise: the message goes onto the job's parked list for the stage and
  the worker acknowledges it and takes the next message, of any job.

When an admitted unit's try ends, done or failed, the same atomic step that takes it off
the running set takes the first parked unit off its list, and the worker publishes it
again at its own priority level: the job's queue of parked units drains one unit per
unit finished. Nothing waits anywhere but in Redis, and a parked unit is a message like
any other:

- a worker that dies between parking a message and acknowledging it leaves a copy of
  the unit queued as well (it is redelivered); a unit that runs twice is recorded once,
  as any redelivered unit is;
- a worker that dies between taking a parked unit and publishing it loses that copy:
  the job stops moving with nothing queued or running, which is what the watchdog and
  ``resume`` redo (the resume step drops the parked lists and sends every unit that is
  not done, so none is sent twice);
- a running entry whose worker died is forgotten after the broker's visibility timeout,
  when the broker hands the unit out again anyway.

The parked lists count in a queue's backlog (``queues --json``, ``/metrics``), so an
autoscaler sees every unit waiting. A failed or finished job's parked lists are deleted.

Keys, under the job's ledger keys (``embed-fleet:job:<id>:``, see
:mod:`shared.control.ledger`, which makes each job's :class:`JobQuota`)::

    running:<stage>   sorted set: unit -> when its try started (Unix time)
    parked:<stage>    list of ParkedUnit (msgpack), first parked first
    state             hash field ``parked`` (PARKED_FIELD): units parked so far

and ``embed-fleet:parked``, a hash of every parked list that may hold units -> its
queue (what the backlog counts).
"""

from __future__ import annotations

import time

import msgspec
import redis

from shared.control import pipeline
from shared.records.schemas import Struct

PARKED_FIELD = "parked"
"""The job state's count of units parked so far."""

# KEYS: running, parked, the parked index, the job's state; ARGV: unit, now, the oldest
# start still counted, the quota, the parked message, its queue, the state's count of
# units parked. 1: admitted, 0: parked.
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1])
    or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  return 1
end
redis.call('RPUSH', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[3], KEYS[2], ARGV[6])
redis.call('HINCRBY', KEYS[4], ARGV[7], 1)
return 0
"""

# KEYS: running, parked; ARGV: unit. The next parked message, if any.
_RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('LPOP', KEYS[2])
"""

# Forgets the parked lists that no longer exist (a list is deleted with its last unit).
_PRUNE_INDEX = """
for _, key in ipairs(redis.call('HKEYS', KEYS[1])) do
  if redis.call('EXISTS', key) == 0 then redis.call('HDEL', KEYS[1], key) end
end
"""


class ParkedUnit(Struct):
    """A unit set aside by its job's quota, as it is published again.

    Attributes:
        task: The Celery task that runs it (a stage's, or a retriever's of that stage).
        level: Its priority level (``shared.control.fairness``).
        message: The task's message, msgpack.
    """

    task: str
    level: int
    message: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ParkedUnit)


class JobQuota:
    """One job's quota of units in flight per stage (``limit``: 0 is none), its keys
    under ``base`` and its parked lists named in ``index``."""

    def __init__(self, client: redis.Redis, base: str, index: str, limit: int) -> None:
        self.client = client
        self.base = base
        self.index = index
        self.limit = limit
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)

    def k_running(self, stage: str) -> str:
        return f"{self.base}:running:{stage}"

    def k_parked(self, stage: str) -> str:
        return f"{self.base}:parked:{stage}"

    def admit(self, stage: str, unit: str, parked: ParkedUnit, stale_after_s: float) -> bool:
        """Whether ``unit`` may run now; if not, ``parked`` is on the job's list.
        A running entry older than ``stale_after_s`` (its worker died and the broker
        hands the unit out again after that long) no longer counts."""
        now = time.time()
        admitted = self._admit(
            keys=[
                self.k_running(stage),
                self.k_parked(stage),
                self.index,
                f"{self.base}:state",
            ],
            args=[
                unit,
                now,
                now - stale_after_s,
                self.limit,
                _encoder.encode(parked),
                pipeline.routes()[parked.task],
                PARKED_FIELD,
            ],
        )
        return bool(admitted)

    def release(self, stage: str, unit: str) -> ParkedUnit | None:
        """``unit``'s try ended: off the running set; the next parked unit, taken off
        its list for the caller to publish."""
        found = self._release(keys=[self.k_running(stage), self.k_parked(stage)], args=[unit])
        return _decoder.decode(found) if found else None

    def running(self, stage: str) -> int:
        return int(self.client.zcard(self.k_running(stage)))

    def parked(self, stage: str) -> int:
        return int(self.client.llen(self.k_parked(stage)))

    def clear(self, stages: list[str]) -> None:
        """Drop the parked units and running entries of ``stages``: the job ended (no
        parked unit will be run), or ``resume`` sends every unit not done again."""
        if not stages:
            return
        keys = [key for stage in stages for key in (self.k_running(stage), self.k_parked(stage))]
        pipe = self.client.pipeline()
        pipe.delete(*keys)
        pipe.hdel(self.index, *[self.k_parked(stage) for stage in stages])
        pipe.execute()


def parked_counts(client: redis.Redis, index_key: str) -> dict[str, int]:
    """Units parked by quotas, per queue, over every job whose parked lists are named
    in ``index_key`` (one round trip to forget the lists that are gone, one to read
    the index, one to count)."""
    client.register_script(_PRUNE_INDEX)(keys=[index_key])
    index = {_text(key): _text(queue) for key, queue in client.hgetall(index_key).items()}
    if not index:
        return {}
    pipe = client.pipeline()
    for key in index:
        pipe.llen(key)
    counts: dict[str, int] = {}
    for queue, length in zip(index.values(), pipe.execute(), strict=True):
        counts[queue] = counts.get(queue, 0) + int(length)
    return counts


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value

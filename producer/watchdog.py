"""The watchdog of a followed job: re-drive it when it has stalled.

A job stalls when a message is lost (a broker that dropped it, an aggregator that died
between winning a phase and publishing the next step): the ledger stops moving and no
worker will ever move it. A dead worker is not a stall: its unacknowledged unit sits in
the broker's ``unacked`` record until it is redelivered. So the rule is: no progress in
the ledger for ``EMBED_FLEET_STALL_TIMEOUT`` seconds, while no queue of the fleet holds a
message and no worker holds one unacknowledged. Then the watchdog does what
``embed-collections resume`` does. On a busy shared fleet the queues are rarely all
empty, so it errs on the side of waiting; a re-drive that was not needed costs
repeated work, never a wrong result (see ``workers.aggregate.resume``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import msgspec
from celery import Celery

from producer.backlog import fleet_idle
from producer.consumers import QueueWatch
from shared.control.celery_app import send_resume
from shared.control.ledger import JobLedger

# How often the ledger is looked at (the follow loop ticks faster).
CHECK_EVERY_S = 2.0


def redrive(ledger: JobLedger, app: Celery) -> None:
    """Hand the job to the fleet's resume step (what ``embed-collections resume`` does)."""
    ledger.mark_resuming()
    send_resume(app, ledger.job_id)


class Watchdog:
    """A follow loop's ``on_tick``: re-drives the job after ``stall_s`` without progress
    while the fleet is idle (see the module doc). ``say`` tells the user. With
    ``queues`` (a shared fleet), it also names those of the job's queues that no worker
    consumes once the job has waited ``queue_wait_s`` on them
    (:class:`producer.consumers.QueueWatch`): a job waiting there is stuck, not busy."""

    def __init__(
        self,
        ledger: JobLedger,
        app: Celery,
        stall_s: float,
        say: Callable[[str], None],
        queues: Sequence[str] = (),
        queue_wait_s: float = 30.0,
    ) -> None:
        self.ledger = ledger
        self.app = app
        self.stall_s = stall_s
        self.say = say
        self.queue_watch = QueueWatch(ledger.client, app, ledger.job_id, queues, queue_wait_s, say)
        self._seen = b""
        self._moved_at = time.monotonic()
        self._checked_at = 0.0

    def __call__(self) -> None:
        self.queue_watch()
        now = time.monotonic()
        if self.stall_s <= 0 or now - self._checked_at < CHECK_EVERY_S:
            return
        self._checked_at = now
        seen = msgspec.json.encode(self.ledger.progress())
        if seen != self._seen:
            self._seen, self._moved_at = seen, now
            return
        stalled = now - self._moved_at
        if stalled < self.stall_s or not self.ledger.phase_opened("encode"):
            return
        if not fleet_idle(self.ledger.client):
            return
        self.say(
            f"job {self.ledger.job_id} made no progress for {stalled:.0f} s with nothing "
            "queued or running: re-driving it (as `embed-collections resume` does)"
        )
        redrive(self.ledger, self.app)
        self._moved_at = now

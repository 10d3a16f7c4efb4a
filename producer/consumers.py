"""A queue nobody consumes, named: the job would wait on it for ever without a word.

A fleet started without a worker on one of a job's queues (the earlier README's
``-Q aggregate`` and no ``prepare`` worker, say) takes the job's units there and keeps
them: the live view stands at ``validate 0/1``, and the watchdog, which sees a message
waiting, takes the fleet for busy. So whoever follows a job on a shared fleet asks the
workers which queues they consume (Celery's ``inspect active_queues``, as ``queues``
does) while the job's queues hold messages, and says in one line which queue nobody
consumes, once it has waited ``EMBED_FLEET_QUEUE_WAIT`` seconds, with the command that
starts such a worker. ``run`` says so before it enqueues anything, and ``status`` when
it is asked.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import redis
from celery import Celery

from producer.backlog import consumers, waiting_counts
from shared.records.logs import get_logger

log = get_logger("consumers")

# How often a follower looks at the job's queues (a Redis round trip), how often it asks
# the workers who consumes them (a broadcast every worker answers), and how long it waits
# for their answer.
LOOK_EVERY_S = 1.0
ASK_EVERY_S = 5.0
ANSWER_TIMEOUT_S = 1.0


def start_command(queue: str) -> str:
    """The command that starts a worker for ``queue``."""
    return f"celery -A workers.app worker -Q {queue} -c 1"


def unconsumed(
    app: Celery, queues: Sequence[str], timeout_s: float = ANSWER_TIMEOUT_S
) -> list[str]:
    """Those of ``queues`` that no worker answering within ``timeout_s`` consumes (all
    of them when no worker answers)."""
    found = consumers(app, timeout_s) or {}
    return [queue for queue in queues if not found.get(queue)]


def pending(client: redis.Redis, queues: Sequence[str]) -> list[str]:
    """Those of ``queues`` that hold messages waiting, in their order."""
    waiting = waiting_counts(client)
    return [queue for queue in queues if waiting.get(queue, 0) > 0]


def stuck(client: redis.Redis, app: Celery, queues: Sequence[str]) -> list[str]:
    """Those of ``queues`` that hold messages waiting and that no worker consumes."""
    holding = pending(client, queues)
    return unconsumed(app, holding) if holding else []


def unconsumed_line(queues: Sequence[str], subject: str) -> str:
    """One line naming queues nobody consumes and the commands that start their workers."""
    names = ", ".join(f"`{q}`" for q in queues)
    noun, them = ("queue", "one") if len(queues) == 1 else ("queues", "them")
    starts = "; ".join(f"`{start_command(q)}`" for q in queues)
    return f"{subject} {noun} {names}, which no worker consumes: start {them} with {starts}"


class QueueWatch:
    """A follower's check for queues nobody consumes (see the module doc).

    Called on every tick of the follow loop; every :data:`LOOK_EVERY_S` it looks at
    which of the job's queues hold messages, in a thread of its own (the workers' answer
    takes up to a second, which the live view should not wait for). Who consumes them
    it asks the workers at most every :data:`ASK_EVERY_S`, and again just before it
    names a queue, so a queue is named on a fresh answer. A queue is named once, after
    ``wait_s`` seconds of messages waiting there with no consumer, counted from the
    first look that saw them (so within about a second of their arrival, not at the
    next ask); a consumer that comes resets it.
    """

    def __init__(
        self,
        client: redis.Redis,
        app: Celery,
        job_id: str,
        queues: Sequence[str],
        wait_s: float,
        say: Callable[[str], None],
    ) -> None:
        self.client = client
        self.app = app
        self.job_id = job_id
        self.queues = list(queues)
        self.wait_s = wait_s
        self.say = say
        self._unconsumed_since: dict[str, float] = {}
        self._named: set[str] = set()
        self._checked_at = 0.0
        self._consumed: set[str] = set()
        self._asked_for: set[str] = set()
        self._asked_at: float | None = None  # when the workers were last asked
        self._checking = threading.Lock()

    def __call__(self) -> None:
        now = time.monotonic()
        if not self.queues or now - self._checked_at < LOOK_EVERY_S:
            return
        if not self._checking.acquire(blocking=False):
            return  # the last look has not ended yet
        self._checked_at = now
        threading.Thread(target=self._look, name="queue-watch", daemon=True).start()

    def _look(self) -> None:
        try:
            self.check(time.monotonic())
        except Exception:  # a look that fails (Redis away) is tried again next time
            log.debug("could not look at the queues' consumers", exc_info=True)
        finally:
            self._checking.release()

    def check(self, now: float) -> None:
        """One look: the job's queues holding messages, and who consumes them."""
        holding = pending(self.client, self.queues)
        asked = bool(holding) and (
            self._asked_at is None
            or now - self._asked_at >= ASK_EVERY_S
            or not set(holding) <= self._asked_for
        )
        if asked:
            self._ask(holding)
        nobody = [queue for queue in holding if queue not in self._consumed]
        for queue in self.queues:
            if queue not in nobody:
                self._unconsumed_since.pop(queue, None)
                self._named.discard(queue)
        due = []
        for queue in nobody:
            since = self._unconsumed_since.setdefault(queue, now)
            if now - since >= self.wait_s and queue not in self._named:
                due.append(queue)
        if due and not asked:
            self._ask(holding)  # named on a fresh answer: a worker may just have come
            due = [queue for queue in due if queue not in self._consumed]
        if due:
            self._named.update(due)
            self.say(unconsumed_line(due, f"job {self.job_id} waits on"))

    def _ask(self, pending: Sequence[str]) -> None:
        """Ask the workers which of the pending queues they consume."""
        self._consumed = set(pending) - set(unconsumed(self.app, pending))
        self._asked_for = set(pending)
        self._asked_at = time.monotonic()

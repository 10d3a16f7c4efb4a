"""What a worker does when it is told to stop: finish the unit in hand, within a bound.

An autoscaler scales down with SIGTERM (``docker stop``, a deleted pod, KEDA lowering
replicas), then kills after a grace period. Celery answers SIGTERM with its warm
shutdown: it stops taking work and waits for the running task, with no bound. A kill
at the end of the grace period would then leave the task's message unacknowledged in
Redis until the visibility timeout (an hour by default) hands it to another worker:
the job would stall for an hour.

So a stopping worker starts a timer. If the worker is still running when
``EMBED_FLEET_STOP_TIMEOUT`` has passed, it sends itself SIGQUIT, Celery's cold
shutdown: the pool process running the unit is terminated, the message stays
unacknowledged, and the broker channel's close puts it back on its queue (kombu's
restore at shutdown), where another worker takes it at once. Units are idempotent,
so the half-done one is simply done again. Celery's own soft shutdown
(``worker_soft_shutdown_timeout``) bounds the wait too, but it sleeps the whole
timeout in the signal handler, so a unit that finishes in one second still holds the
worker for the full timeout and its acknowledgement waits behind the sleep.

``worker_shutdown`` fires on both paths; ``workers.app`` gives the GPU lease back there.
"""

from __future__ import annotations

import os
import signal
import threading

from shared.records.logs import get_logger

log = get_logger("shutdown")


def bound_the_stop(stop_timeout: float, how: str) -> threading.Timer | None:
    """On a warm shutdown (``how == "Warm"``), arm the cold one after ``stop_timeout``
    seconds (at once for 0). Returns the timer, None for other shutdowns."""
    if how != "Warm":
        return None
    log.warning(
        "stopping: finishing the unit in hand, else handing it back to its queue",
        extra={"fields": {"stop_timeout_s": stop_timeout}},
    )
    timer = threading.Timer(max(0.0, stop_timeout), _hand_back)
    timer.daemon = True  # the worker exits when its unit is done; the timer goes with it
    timer.start()
    return timer


def _hand_back() -> None:
    log.warning("stop timeout passed: handing the unit in hand back to its queue")
    os.kill(os.getpid(), signal.SIGQUIT)

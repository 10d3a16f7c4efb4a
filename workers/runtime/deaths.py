"""Units that kill their worker: a pool process's death told apart from a unit's own end.

A unit whose worker process dies under it (the kernel's OOM killer, a segfault in a
native library, any SIGKILL) never raises: under ``acks_late`` and
``reject_on_worker_lost`` its message goes back to the queue, and without a count it
would take down every worker that picks it up, forever. So:

- each delivery of a unit is counted in the ledger as it starts, and a delivery that
  ends by itself (done, or raising: Celery's retries send a new message, and a
  redelivery after a Redis restart finds its earlier try ended) says so; a delivery
  that never did is a death (the ``deliveries`` hook, ``workers.runtime.middleware``);
- the worker's main process, which sees its pool process go
  (billiard's ``WorkerLostError``, "Worker exited prematurely: signal 9 (SIGKILL)"),
  records how it died in the ledger before Celery requeues the message
  (:class:`FleetRequest`), so that the next delivery can name it. A pool process that
  the main process terminated itself (a stopping worker handing its unit back) is no
  death; where no main process saw the death (the whole worker was killed) the cause
  is ``unknown``;
- the delivery that finds ``EMBED_FLEET_MAX_DELIVERIES`` deaths in a row raises
  :class:`WorkerDied` before it runs anything: the unit is recorded as failed like any
  unit whose retries are spent (a prepare unit fails the job, an encode unit makes it
  ``partial``) and its message is acknowledged. ``resume`` sends it again, its count
  from 0.

``EMBED_FLEET_SIMULATE_WORKER_DEATH=PATTERN`` is the test hook: a unit whose
``<collection>/<job id>/<stage>/<unit>`` matches (``fnmatch``) makes its pool process
SIGKILL itself as it starts, on every delivery (:func:`simulate_worker_death`).
"""

from __future__ import annotations

import fnmatch
import os
import re
import signal
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import Terminated, WorkerLostError
from celery.worker.request import Request

from shared.control.ledger import STEP_DELIVERIES
from shared.records.errors import EmbedFleetError
from shared.records.logs import get_logger
from workers.runtime.context import boot_of

log = get_logger("deaths")

UNKNOWN = "unknown"
# billiard's words for a lost pool process: "signal 9 (SIGKILL)" or "exitcode 1".
_LOST = re.compile(r"exited prematurely: (?:(signal \d+(?: \(\w+\))?)|exitcode (-?\d+))")


class WorkerDied(EmbedFleetError):
    """A unit's worker process died on it ``EMBED_FLEET_MAX_DELIVERIES`` times in a
    row: the unit is failed, not run again (every try would kill a worker alike)."""


def worker_died(job_id: str, deaths: int, last: str) -> WorkerDied:
    """The failure of a unit whose worker died ``deaths`` times, the last by ``last``."""
    return WorkerDied(
        f"its worker died {deaths} times (last: {last or UNKNOWN})",
        "A worker killed as it works is most often out of memory (see the kernel log, "
        "dmesg, on its host) or crashed in native code: give the workers more memory or "
        "the job smaller batches (--batch-chunks, --max-batch-tokens), then "
        f"`embed-collections resume {job_id}` runs the unit again",
    )


def lost_cause(exc: BaseException) -> str | None:
    """How a pool process ended, from the exception its main process got for the task
    it ran: ``signal 9 (SIGKILL)``, ``exit code 1``, :data:`UNKNOWN`; ``None`` when it
    did not die (the task raised, or the main process terminated it: a stop)."""
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    if isinstance(exc, WorkerLostError):
        found = _LOST.search(str(exc))
        if found is None:
            return UNKNOWN
        return found.group(1) or f"exit code {found.group(2)}"
    if isinstance(exc, SystemExit):  # billiard >= 4.3 reports an exit before the process ends
        return f"exit code {exc.code if isinstance(exc.code, int) else 1}"
    return None


def unit_path(collection: str, job_id: str, stage: str, unit: str) -> str:
    """What the test hook's pattern is matched against."""
    return f"{collection}/{job_id}/{stage or STEP_DELIVERIES}/{unit}"


def simulate_worker_death(pattern: str | None, path: str) -> None:
    """The test hook: SIGKILL this process if ``path`` matches ``pattern``."""
    if pattern and fnmatch.fnmatchcase(path, pattern):
        log.warning("simulated worker death", extra={"fields": {"unit": path}})
        os.kill(os.getpid(), signal.SIGKILL)


class FleetRequest(Request):  # type: ignore[misc]
    """A fleet task's request in the worker's main process, where Celery learns that
    the pool process running it is gone: before Celery requeues the message, the
    ledger learns how it died (or that it was handed back, which is no death)."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        note_lost_try(self, exc_info.exception)
        return super().on_failure(exc_info, send_failed_event, return_ok)


def note_lost_try(request: Any, exc: BaseException) -> None:
    """Record in the ledger how the pool process running ``request`` ended, if it did
    not end the try itself. Never raises: Celery's own handling (the requeue) follows,
    whatever the ledger says; a death left unrecorded is named ``unknown``."""
    cause = lost_cause(exc)
    inner = exc.exc if isinstance(exc, ExceptionWithTraceback) else exc
    handed_back = isinstance(inner, Terminated)  # the main process ended it: a stop
    if cause is None and not handed_back:
        return  # the task raised: its pool process ended the try itself (and lives)
    payload = request.args[0] if request.args and isinstance(request.args[0], dict) else {}
    stage = str(getattr(request.task, "stage", ""))
    job_id, unit = payload.get("job_id"), payload.get("unit" if stage else "step")
    boot = boot_of(request.task.app)
    if boot is None or not job_id or not unit:
        return
    fields = {"job_id": job_id, "stage": stage or STEP_DELIVERIES, "unit": unit}
    fields["pid"] = getattr(request, "worker_pid", None)
    try:
        ledger = boot.ledger(str(job_id))
        if cause is None:
            ledger.end_try(stage, str(unit))
            return
        ledger.record_death(stage, str(unit), cause)
        log.warning("a unit's worker process died", extra={"fields": {**fields, "cause": cause}})
    except Exception as error:  # the requeue must follow, whatever happens here
        fields["error"] = f"{type(error).__name__}: {error}"
        log.warning("could not record how a unit's worker process ended", extra={"fields": fields})

"""How the units of many jobs on one fleet take turns: each message's priority level.

Celery's queues on Redis are lists, first in first out: a 2,000-document experiment
submitted behind a month's backfill waits for every unit the backfill has queued. So
each message goes to one of ten priority levels of its queue (kombu's ``priority_steps``:
the lists ``dense``, ``dense\\x06\\x161`` ... ``dense\\x06\\x169``), and a worker always
takes from the highest level that holds a message (0 first). A message's level is
set by two things:

- **its place in its job**: the job's n-th unit of a stage goes to level
  ``floor(log2(n + 1))`` above its band's first, so a job's first unit is at the top
  of its band, its next two one level down, the next four two down, and so on. A job
  that has sent many units sits at the bottom of its band; a new job of the same
  priority starts above it, so its first units run within about one unit's time per
  worker, and two jobs long under way take turns in the order they sent their units.
  The levels of a job's units never depend on another job, so no dispatcher or lock is
  needed, and nothing is held anywhere but in the queue;
- **the job's priority** (``run --priority``): ``urgent`` starts at level 0 and stays
  above every other job's bulk (its deepest level is 6); ``normal`` spans 1 to 9;
  ``batch`` spans 3 to 9, so it shares the bottom level with ``normal``'s bulk and is
  never starved for good: its units run in turn with a normal job's older ones.

An aggregator step (the hand-off between phases) goes at the top of its job's band:
it is one message that a whole job waits on.
"""

from __future__ import annotations

from typing import Literal

Priority = Literal["urgent", "normal", "batch"]
PRIORITIES: tuple[Priority, ...] = ("urgent", "normal", "batch")
LEVELS = 10
"""kombu's priority steps 0..9 (0 is taken first)."""
BANDS: dict[Priority, tuple[int, int]] = {"urgent": (0, 6), "normal": (1, 9), "batch": (3, 9)}
"""Each priority's first and last level."""


def level(priority: Priority, ordinal: int) -> int:
    """The level of a job's unit: the ``ordinal``-th (from 0) of its stage, in a job of
    ``priority``."""
    first, last = BANDS[priority]
    return min(last, first + max(0, ordinal + 1).bit_length() - 1)


def step_level(priority: Priority) -> int:
    """The level of an aggregator step of a job of ``priority``."""
    return BANDS[priority][0]

"""How much of a unit of several staged batches a worker encodes before it hands the
rest back to the queue: as much as it does in about :data:`UNIT_TARGET_S`, by its own pace.

A GPU stage's message holds up to 64 staged batches (:data:`shared.control.pipeline.
GPU_UNIT_TOKENS`), so that a fast worker's fixed cost per message (the broker, the
ledger, the reads and writes) stays small beside its model's time. The producer cannot
know who will take a message, and a slow worker would hold such a unit for minutes: a
CPU encoding MiniLM at 15 chunks/s spent 113 s on the demo's one unit of 13 batches
while the live view stood at ``dense 0/1837``; a retry would have done it all again, and
at the end of a job a second worker would idle while the first held the last unit. So a
worker takes the batches it encodes in about ``UNIT_TARGET_S`` by its own measured
seconds per batch (at least one), and once their shards are written it sends the rest
back as one message; each batch is still counted by its id, whoever encodes it. Before
it has a pace of its own (its first unit, or one in which a model was loaded) it takes
one batch. A GPU worker's pace soon lets it take whole units; a CPU worker's takes
about one batch a message, as a CPU stage's messages are staged anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# How long a unit should keep a worker: long beside a message's fixed cost (tens of
# milliseconds), short beside a person watching the live view.
UNIT_TARGET_S = 10.0
# The weight of the latest unit in the pace (the rest: the pace so far).
LATEST_WEIGHT = 0.5


@dataclass
class UnitPace:
    """A worker process's seconds per staged batch, per encode stage."""

    seconds_per_batch: dict[str, float] = field(default_factory=dict)

    def take(self, stage: str, batches: int) -> int:
        """How many of a unit's ``batches`` to encode now (the rest go back)."""
        pace = self.seconds_per_batch.get(stage)
        if pace is None:
            return min(1, batches)
        return max(1, min(batches, int(UNIT_TARGET_S / max(pace, 1e-6))))

    def record(self, stage: str, batches: int, seconds: float) -> None:
        """What ``batches`` took, wall time from reading them to their shards written."""
        if batches < 1:
            return
        latest = seconds / batches
        before = self.seconds_per_batch.get(stage)
        self.seconds_per_batch[stage] = (
            latest if before is None else LATEST_WEIGHT * latest + (1 - LATEST_WEIGHT) * before
        )

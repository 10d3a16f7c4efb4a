"""Dynamic batch sizing: a padded-token budget that halves on out-of-memory and grows
back, learned per (stage, model, device) for the worker's life.

Every GPU stage (dense, sparse, rerank) cuts its model batches with
:func:`workers.batching.token_budget_batches` at the current budget. When a batch
raises ``torch.cuda.OutOfMemoryError`` the budget halves and the batches not yet run are
cut again; after ``grow_after`` good batches in a row it doubles, up to the ceiling it
started at, so one unlucky batch of long chunks does not slow the rest of the worker's
life. The budget lives in this module, not in a task, because the memory a device can
spare is a property of the worker process.

``EMBED_FLEET_SIMULATE_OOM_TOKENS=N`` makes every model call whose padded size is above
``N`` tokens raise the real ``torch.cuda.OutOfMemoryError`` before it runs: the tests
exercise the same recovery on a CPU that a GPU takes.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shared.errors import EmbedFleetError
from shared.logs import get_logger
from workers.batching import token_budget_batches
from workers.measure import StageFigures, model_batch

log = get_logger("adaptive")

SIMULATE_OOM_ENV = "EMBED_FLEET_SIMULATE_OOM_TOKENS"
# Good batches in a row after which a shrunk budget doubles again.
GROW_AFTER = 8
# Runs of good batches after which a size that ran out of memory is tried again (the
# pressure may have been another process's, and gone).
FORGET_AFTER = 4


class TokenBudget:
    """The padded-token budget of one (stage, model, device) in this process.

    Attributes:
        ceiling: The initial and largest budget.
        value: The budget the next batch is cut at.
        oom_count: Out-of-memory errors seen over the worker's life.
        failed_at: The smallest padded size that ran out of memory lately: the budget
            grows back only below it, until ``FORGET_AFTER`` runs of good batches say
            the memory is there again.
    """

    def __init__(self, ceiling: int, grow_after: int = GROW_AFTER) -> None:
        if ceiling < 1:
            raise ValueError(f"a token budget must be >= 1, got {ceiling}")
        if grow_after < 1:
            raise ValueError(f"grow_after must be >= 1, got {grow_after}")
        self.ceiling = ceiling
        self.value = ceiling
        self.grow_after = grow_after
        self.oom_count = 0
        self.failed_at: int | None = None
        self._streak = 0

    def shrink(self, failed_tokens: int | None = None) -> int:
        """Halve after an out-of-memory error of a batch of ``failed_tokens`` padded
        tokens; returns the new budget."""
        self.oom_count += 1
        self._streak = 0
        self.value = max(self.value // 2, 1)
        if failed_tokens is not None:
            self.failed_at = min(failed_tokens, self.failed_at or failed_tokens)
        return self.value

    def interrupted(self) -> None:
        """A batch that neither succeeded nor ran out of memory (a time limit) breaks
        the run of good batches without changing the budget."""
        self._streak = 0

    def succeeded(self) -> None:
        """Count a good batch; after ``grow_after`` in a row the budget doubles (up to
        the ceiling, and below the last size that failed)."""
        self._streak += 1
        if self._streak % self.grow_after or self.value >= self.ceiling:
            return
        grown = min(self.value * 2, self.ceiling)
        if self.failed_at is not None and grown >= self.failed_at:
            if self._streak < self.grow_after * FORGET_AFTER:
                return
            self.failed_at = None
        self.value = grown
        self._streak = 0


_budgets: dict[tuple[str, str, str], TokenBudget] = {}
_lock = threading.Lock()


def budget_for(stage: str, model: str, device: str, ceiling: int) -> TokenBudget:
    """The process's budget for (stage, model, device), created at ``ceiling``."""
    key = (stage, model, device)
    with _lock:
        if key not in _budgets:
            _budgets[key] = TokenBudget(ceiling)
        return _budgets[key]


def learned_budgets(stage: str) -> dict[str, int]:
    """Model name to current budget, for every budget of ``stage`` in this process."""
    with _lock:
        return {model: b.value for (s, model, _), b in _budgets.items() if s == stage}


def padded_tokens(group: Sequence[int], lengths: Sequence[int]) -> int:
    """The size of the padded tensor a model batch makes: items x longest item."""
    return len(group) * max((lengths[i] for i in group), default=0)


def recut(pending: deque[list[int]], lengths: Sequence[int], budget: int) -> deque[list[int]]:
    """Cut the groups not yet run again at a new budget, still longest first: after an
    OOM the old groups would fail again; after a grow-back bigger groups are cheaper."""
    flat = [i for group in pending for i in group]
    groups = token_budget_batches([lengths[i] for i in flat], budget)
    return deque([flat[j] for j in group] for group in groups)


def check_simulated_oom(tokens: int) -> None:
    """The test hook: raise a real CUDA out-of-memory error above the configured size."""
    limit = os.environ.get(SIMULATE_OOM_ENV)
    if limit and tokens > int(limit):
        import torch

        raise torch.cuda.OutOfMemoryError(
            f"simulated: {tokens} padded tokens > {SIMULATE_OOM_ENV}={limit}"
        )


class BatchTooLarge(EmbedFleetError):
    """A single item ran out of memory: no smaller batch exists."""


@dataclass
class AdaptiveRun:
    """What one :func:`run_adaptive` call did."""

    batch_sizes: list[int] = field(default_factory=list)
    oom_count: int = 0


def run_adaptive(
    lengths: Sequence[int],
    call: Callable[[list[int]], None],
    *,
    stage: str,
    model: str,
    device: str,
    ceiling: int,
    figures: StageFigures,
    too_large: Callable[[list[int], str], None] | None = None,
) -> AdaptiveRun:
    """Run ``call`` over token-budget groups of item indices, adapting to memory.

    Args:
        lengths: Token count of each item, special tokens included.
        call: Runs the model on one group of item indices and stores its output.
        stage: The stage, for the budget's key, spans and logs.
        model: The model's name, likewise.
        device: Where the model runs, likewise.
        ceiling: The budget to start from the first time (the largest it grows to).
        figures: The unit's running figures; each batch's peak memory and OOM go in.
        too_large: Handles a single item that runs out of memory alone (given the
            group and the reason); without it, that raises :class:`BatchTooLarge`.

    Returns:
        The model batch sizes that ran and the out-of-memory errors on the way.

    Raises:
        BatchTooLarge: when a batch of one item runs out of memory.
    """
    import torch

    budget = budget_for(stage, model, device, ceiling)
    run = AdaptiveRun()
    pending = deque(token_budget_batches(lengths, budget.value))
    cut_at = budget.value
    while pending:
        if budget.value != cut_at:
            pending = recut(pending, lengths, budget.value)
            cut_at = budget.value
        group = pending.popleft()
        out_of_memory = False
        tokens = padded_tokens(group, lengths)
        try:
            with model_batch(stage, model, device, len(group), tokens, run.oom_count) as record:
                check_simulated_oom(tokens)
                call(group)
        except torch.cuda.OutOfMemoryError:
            # Handled outside the except block, whose traceback pins the failed
            # call's frames (and tensors).
            out_of_memory = True
        figures.add(record, device)
        if not out_of_memory:
            run.batch_sizes.append(len(group))
            budget.succeeded()
            continue
        run.oom_count += 1
        new_budget = budget.shrink(tokens)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        what = f"{stage} {model} on {device}"
        fields = {"what": what, "items": len(group), "budget": new_budget}
        log.warning("batch out of memory; budget halved", extra={"fields": fields})
        if len(group) > 1:
            pending.appendleft(group)
            continue
        reason = f"{what}: one item of {lengths[group[0]]} tokens runs out of memory alone"
        if too_large is None:
            raise BatchTooLarge(
                reason,
                "Lower the model's max_seq_length, free the device, or run this stage "
                "on a device with more memory",
            )
        too_large(group, reason)
    figures.budgets[model] = budget.value
    return run

"""Token-budget batching: model batches cut by padded tokens, not by item count.

A batch of short chunks can hold many more items than a batch of 256-token chunks for
the same memory and time, so the budget is ``len(batch) * longest item``, the size of
the padded tensor the model actually sees. Items are sorted by length first so that
padding stays small.
"""

from __future__ import annotations

from collections.abc import Sequence


def token_budget_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group item indices into batches whose padded size stays within ``max_tokens``.

    Args:
        lengths: Token count of each item (special tokens included or not, but alike).
        max_tokens: Budget of ``batch size * longest item`` per batch. An item longer
            than the budget gets a batch of its own.

    Returns:
        Lists of indices into ``lengths``, longest items first.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        longest_if_added = max(longest, lengths[i], 1)
        if current and longest_if_added * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest_if_added = [], max(lengths[i], 1)
        current.append(i)
        longest = longest_if_added
    if current:
        batches.append(current)
    return batches

"""Token-budget batching: every item once, padded size within budget, longest first."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from workers.inference.batch_runner import (
    BatchRunner,
    TokenBudget,
    first_batch,
    model_rows,
    pad_multiple,
    padded_width,
    token_budget_batches,
)
from workers.runtime.measure import StageFigures


def check_batches(
    lengths: list[int], budget: int, batches: list[list[int]], multiple: int = 1
) -> None:
    flat = [i for batch in batches for i in batch]
    # Every index exactly once.
    assert sorted(flat) == list(range(len(lengths)))
    assert all(batches), "no empty batches"

    def width(batch: list[int]) -> int:
        return -(-max(max(lengths[i] for i in batch), 1) // multiple) * multiple

    for batch in batches:
        padded = len(batch) * width(batch)
        assert padded <= budget or len(batch) == 1, (batch, [lengths[i] for i in batch])
    # Longest first, across and within batches (ties in index order).
    keys = [(-lengths[i], i) for i in flat]
    assert keys == sorted(keys)
    # Greedy: a batch was only closed because the next item would not have fit.
    for batch, following in itertools.pairwise(batches):
        assert (len(batch) + 1) * width(batch) > budget, (batch, following)


def test_empty_input() -> None:
    assert token_budget_batches([], 100) == []


def test_simple_case() -> None:
    lengths = [10, 50, 20, 50, 5]
    batches = token_budget_batches(lengths, 100)
    check_batches(lengths, 100, batches)
    assert batches[0] == [1, 3]  # the two 50s fill the budget exactly
    assert batches[1:] == [[2, 0, 4]]


def test_item_longer_than_budget_gets_its_own_batch() -> None:
    lengths = [5, 300, 5, 120]
    batches = token_budget_batches(lengths, 100)
    check_batches(lengths, 100, batches)
    assert [1] in batches
    assert [3] in batches
    assert sorted(batches[-1]) == [0, 2]


def test_short_items_share_a_batch() -> None:
    lengths = [4] * 100
    batches = token_budget_batches(lengths, 64)
    check_batches(lengths, 64, batches)
    assert [len(b) for b in batches] == [16] * 6 + [4]


def test_zero_lengths_still_batch() -> None:
    lengths = [0, 0, 0, 3, 0]
    batches = token_budget_batches(lengths, 6)
    check_batches(lengths, 6, batches)
    assert all(len(b) <= 6 for b in batches)


@pytest.mark.parametrize("seed", range(40))
def test_random_inputs(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.choice([1, 2, 3, 10, 100, 1000])
    top = rng.choice([1, 8, 64, 512, 4096])
    lengths = [rng.randint(0, top) for _ in range(n)]
    budget = rng.choice([1, 16, 100, 512, 4096, 16384, 10**6])
    multiple = rng.choice([1, 8, 16])
    batches = token_budget_batches(lengths, budget, multiple)
    check_batches(lengths, budget, batches, multiple)
    # Deterministic: the same input batches the same way.
    assert token_budget_batches(lengths, budget, multiple) == batches
    # Accepts any sequence, not only lists.
    assert token_budget_batches(tuple(lengths), budget, multiple) == batches


def test_a_long_run_meets_few_shapes_when_widths_are_rounded() -> None:
    """What bounds a CPU worker's memory: oneDNN keeps a kernel per input shape. With
    widths rounded to the CPU's multiple, every batch of a unit but its last has the
    rows the budget gives its width: one shape per width (16 up to 256 tokens), and
    otherwise only each unit's last batch. At exact widths a long run meets several
    times as many shapes."""
    rng = random.Random(0)
    units = [[rng.randint(5, 256) for _ in range(1536)] for _ in range(300)]
    multiple = pad_multiple("cpu", torch.bfloat16)
    assert pad_multiple("cpu", torch.float32) == 1  # BLAS keeps nothing per shape

    def shape(lengths: list[int], batch: list[int], multiple: int) -> tuple[int, int]:
        return len(batch), padded_width(max(lengths[i] for i in batch), multiple)

    full: set[tuple[int, int]] = set()
    for lengths in units:
        batches = token_budget_batches(lengths, 4096, multiple)
        for batch in batches[:-1]:
            rows, width = shape(lengths, batch, multiple)
            assert rows == 4096 // width
            full.add((rows, width))
    assert len(full) <= 256 // multiple
    rounded = {
        shape(L, b, multiple) for L in units for b in token_budget_batches(L, 4096, multiple)
    }
    exact = {shape(L, b, 1) for L in units for b in token_budget_batches(L, 4096)}
    assert len(exact) > 3 * len(rounded)
    assert pad_multiple("cuda:0") == 8


def test_last_batches_run_at_rows_that_are_powers_of_two_within_the_budget() -> None:
    """The rest of a long run's shapes: each unit's last batch has whatever rows are
    left. Run at the next power of two (within the budget), a width meets a handful of
    row counts over 300 units instead of dozens; fp32 on a CPU and a GPU run exact."""
    rng = random.Random(1)
    units = [[rng.randint(5, 256) for _ in range(rng.randint(1, 1536))] for _ in range(300)]
    multiple = pad_multiple("cpu", torch.bfloat16)
    exact: dict[int, set[int]] = {}
    shaped: dict[int, set[int]] = {}
    for lengths in units:
        for batch in token_budget_batches(lengths, 4096, multiple):
            width = padded_width(max(lengths[i] for i in batch), multiple)
            rows = model_rows(len(batch), width, 4096, "cpu", multiple)
            assert len(batch) <= rows and rows * width <= max(4096, width)
            # A power of two, or the width's full rows.
            assert rows & (rows - 1) == 0 or rows == 4096 // width, (rows, width)
            exact.setdefault(width, set()).add(len(batch))
            shaped.setdefault(width, set()).add(rows)
    assert max(len(rows) for rows in exact.values()) > 30
    # Powers of two up to the width's full rows, and the full rows.
    assert all(len(rows) <= (4096 // width).bit_length() + 1 for width, rows in shaped.items())
    assert model_rows(5, 16, 4096, "cpu", 1) == 5  # fp32
    assert model_rows(5, 16, 4096, "cuda:0", 8) == 5
    assert model_rows(3, 1024, 4096, "cpu", 16) == 4
    assert model_rows(3, 1200, 4096, "cpu", 16) == 3  # the budget holds 3, not 4


def test_the_runner_gives_the_model_its_items_repeated_up_to_the_rows() -> None:
    """A bf16 model on a CPU is called with the batch's own items repeated up to
    model_rows; the run counts each batch's items, not the rows, and every item is
    written once per call that saw it."""
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    lengths = [60] * 70 + [10] * 5  # 64 wide: a full batch of 64, then 11 items
    calls: list[list[int]] = []
    runner = BatchRunner("dense", "m", "cpu", TokenBudget(4096, 8))
    done = runner.run(model, lengths, lambda _, group: calls.append(group), figures=StageFigures())
    assert [len(set(group)) for group in calls] == done.batch_sizes
    assert sorted(i for group in calls for i in set(group)) == list(range(75))
    assert [len(group) for group in calls] == [64, 16]
    last = calls[-1]
    assert last[:11] == list(range(64, 75)) and set(last[11:]) == {74}
    fp32: list[list[int]] = []
    runner.run(torch.nn.Linear(2, 2), lengths, lambda _, g: fp32.append(g), figures=StageFigures())
    assert [len(group) for group in fp32] == [len(set(group)) for group in fp32]


def test_first_batch_is_the_longest_items_the_budget_holds() -> None:
    lengths = [10, 50, 20, 50, 5, 40]
    items = [f"item{i}" for i in range(len(lengths))]
    assert first_batch(items, lengths, 150) == ["item1", "item3", "item5"]  # 3 x 50
    assert first_batch(items, lengths, 10) == ["item1"]  # too long alone: its own batch
    assert first_batch([], [], 100) == []

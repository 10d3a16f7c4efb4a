"""Dynamic batch sizing with simulated out-of-memory errors: the real recovery code
(BatchRunner), the real models, on a CPU (``EMBED_FLEET_SIMULATE_OOM_TOKENS`` raises the
real ``torch.cuda.OutOfMemoryError`` above a padded size)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dense import TEXTS, batch

from shared.control.settings import Settings
from shared.inputs.models import BUNDLED_SPLADE, DEFAULT_DENSE_MODEL
from workers.inference import batch_runner, dense
from workers.inference.batch_runner import BatchTooLarge, TokenBudget, check_simulated_oom
from workers.inference.devices import default_batch_tokens
from workers.inference.engine import Inference
from workers.inference.sparse import SparseVectorGenerator
from workers.runtime.measure import StageFigures


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_budget_halves_grows_back_below_the_failing_size_then_forgets() -> None:
    budget = TokenBudget(4096, grow_after=2)
    assert budget.shrink(failed_tokens=3000) == 2048
    for _ in range(2):
        budget.succeeded()
    assert budget.value == 2048  # 4096 would be >= 3000, which just failed
    for _ in range(2 * batch_runner.FORGET_AFTER - 2):
        budget.succeeded()
    assert budget.value == 4096 and budget.failed_at is None  # the pressure was transient
    assert budget.oom_count == 1


def test_runner_recuts_and_learns() -> None:
    # Budgets live for the process: each test starts from a fresh one.
    inference = Inference(simulate_oom_tokens=100)
    lengths = [30] * 20
    seen: list[list[int]] = []
    figures = StageFigures()
    runner = inference.runner("dense", "m", "cpu", 1024)
    run = runner.run(None, lengths, lambda model, group: seen.append(group), figures=figures)
    assert sorted(i for group in seen for i in group) == list(range(20))  # each item once
    assert all(len(group) * 30 <= 100 for group in seen)
    assert run.oom_count == figures.oom_count > 0
    assert figures.budgets["m"] < 100 < 1024
    # What it learned stays with the worker process, for the next unit.
    assert inference.budgets.get("dense", "m", "cpu", 1024).value == figures.budgets["m"]
    assert figures.peak_memory_kind == "rss" and figures.peak_memory_bytes > 0


def test_inputs_are_laid_out_a_window_ahead_and_again_after_a_recut() -> None:
    """The runner tells the feed which groups come next, LAY_OUT_AHEAD at a time and
    exactly as the calls will get them; after an out-of-memory re-cut the old window is
    stale, and the next call is announced in a new one."""
    inference = Inference(simulate_oom_tokens=300)
    lengths = [10] * 200 + [30] * 40
    windows: list[list[list[int]]] = []
    called: list[list[int]] = []
    runner = inference.runner("dense", "m", "cpu", 1024)
    runner.run(
        None,
        lengths,
        lambda model, group: called.append(group),
        figures=StageFigures(),
        lay_out=lambda model, groups: windows.append(groups),
    )
    assert sorted(i for group in called for i in group) == list(range(240))
    assert all(0 < len(window) <= batch_runner.LAY_OUT_AHEAD for window in windows)
    announced = [group for window in windows for group in window]
    # Every call was announced, in its window, in the order of the calls.
    assert all(group in announced for group in called)
    positions = [announced.index(group) for group in called]
    assert positions == sorted(positions)
    # The first window was cut at 1024 tokens, before the first out-of-memory error.
    assert max(len(group) * 30 for group in windows[0]) > 300
    assert len(windows) > len(called) / batch_runner.LAY_OUT_AHEAD


def test_one_item_too_large_raises_without_a_fallback() -> None:
    runner = Inference(simulate_oom_tokens=10).runner("dense", "m", "cpu", 64)
    with pytest.raises(BatchTooLarge, match="one item of 30 tokens"):
        runner.run(None, [30], lambda model, group: None, figures=StageFigures())


def test_dense_stage_completes_under_simulated_oom() -> None:
    plain = Inference()
    reference = dense.encode_batch(plain, batch(), [DEFAULT_DENSE_MODEL], dtype="fp32")
    assert reference.figures.oom_count == 0
    lengths = [c.n_tokens + 2 for c in batch().chunks]
    # Two of the longest chunk no longer fit; one does. Same models, fresh budgets.
    squeezed = Inference(models=plain.models, simulate_oom_tokens=max(lengths) + 1)
    result = dense.encode_batch(squeezed, batch(), [DEFAULT_DENSE_MODEL], dtype="fp32")
    assert result.figures.oom_count > 0
    learned = result.figures.budgets[DEFAULT_DENSE_MODEL]
    budget = squeezed.budgets.get("dense", DEFAULT_DENSE_MODEL, "cpu", 0)
    assert budget.failed_at is not None
    assert learned == budget.value < budget.failed_at < default_batch_tokens("dense", "cpu")
    for name, matrix in result.shard.vectors.items():
        np.testing.assert_allclose(
            matrix.to_numpy(), reference.shard.vectors[name].to_numpy(), atol=1e-5
        )
    assert len(result.batch_sizes) > len(reference.batch_sizes)


def test_sparse_single_chunk_oom_falls_back_and_the_rest_is_live() -> None:
    lengths = sorted(c.n_tokens + 2 for c in batch().chunks)
    # Only the longest chunk is too large even alone: it alone falls back.
    inference = Inference(simulate_oom_tokens=lengths[-2])
    result = SparseVectorGenerator(inference, "cpu", dtype="fp32").encode(batch(), [BUNDLED_SPLADE])
    rows = result.shard.rows[BUNDLED_SPLADE]
    sources = [row.source for row in rows]
    longest = max(range(len(TEXTS)), key=lambda i: len(TEXTS[i].split()))
    assert sources[longest] == "missing"  # no metadata weights to fall back to
    assert all(s == "live" for i, s in enumerate(sources) if i != longest)
    assert result.figures.oom_count > 0
    assert any("runs out of memory alone" in e for e in result.shard.errors)


def test_simulated_oom_is_the_real_cuda_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBED_FLEET_SIMULATE_OOM_TOKENS", "5")
    limit = Settings.from_env().simulate_oom_tokens
    with pytest.raises(torch.cuda.OutOfMemoryError):
        check_simulated_oom(6, limit)
    check_simulated_oom(5, limit)


def test_an_item_too_large_alone_leaves_the_budget_alone() -> None:
    """Retrying a unit with one over-long item must not halve the worker's budget on
    every try: only batches of several items shrink it."""
    inference = Inference(simulate_oom_tokens=50)
    runner = inference.runner("sparse", "m", "cpu", 4096)
    given_up: list[list[int]] = []
    fallback = batch_runner.ItemFallback("metadata", lambda group, reason: given_up.append(group))
    values = []
    for _ in range(4):  # the first try and three retries of the same unit
        run = runner.run(
            None, [60, 10, 10], lambda model, group: None, figures=StageFigures(), fallback=fallback
        )
        assert run.fallbacks == {"metadata": 1} and run.oom_count >= 1
        values.append(runner.budget.value)
    assert given_up == [[0]] * 4
    assert values[1:] == values[:1] * 3  # settled after the first try
    assert 20 <= values[0] < 4096  # [10, 10] fits; the mixed batch did not
    assert runner.budget.oom_count == inference.budgets.oom_total() > 4


def test_ooms_of_a_failed_try_reach_the_ledger(redis_client, tmp_path) -> None:
    """A unit that raises after out-of-memory errors has no report to carry them: the
    hook adds them to the stage's figures, which the live view and the export show."""
    from test_ledger import spec as ledger_spec

    from shared.control.ledger import JobLedger
    from shared.records.job_store import JobStore
    from shared.records.storage import LocalStore
    from workers.runtime.context import Job, WorkerBoot, WorkerContext
    from workers.runtime.middleware import ModelActivity, UnitRun

    spec = ledger_spec("job-oom")
    ledger = JobLedger(redis_client, spec.job_id)
    ledger.open(spec, documents_total=1, bytes_total=1)
    lengths = [c.n_tokens + 2 for c in batch().chunks]
    inference = Inference(simulate_oom_tokens=max(lengths) - 1)  # the longest never fits
    context = WorkerContext(WorkerBoot(Settings(broker_url=None)), redis_client, inference)
    job = Job(spec, ledger, JobStore(LocalStore(tmp_path), spec.collection, spec.job_id))
    unit = UnitRun(context, None, "dense", "b000000", job, batch())  # type: ignore[arg-type]
    with pytest.raises(BatchTooLarge), ModelActivity().around(unit):
        dense.encode_batch(inference, batch(), [DEFAULT_DENSE_MODEL], dtype="fp32")
    lost = inference.budgets.oom_total()
    assert lost > 0
    assert ledger.failed_try_ooms("dense") == lost
    (dense_stage,) = [s for s in ledger.progress(detail=True).stages if s.stage == "dense"]
    assert dense_stage.summary is not None and dense_stage.summary.oom_count == lost

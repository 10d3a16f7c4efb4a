"""CrossEncoder reranking through the real loading code and the model's own forward pass
(a tiny random BERT), compared with the real ``predict``.

Out-of-memory errors and slow batches are simulated around the real model: a wrapper
whose forward pass raises ``torch.cuda.OutOfMemoryError`` above a batch size, and a
``before_batch`` hook that sleeps past the time limit. The device label is only a
string to the executor (inputs go where the model is), so the CPU-fallback paths run
without CUDA.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from crossencoder import build_tiny_cross_encoder

from workers.inference.devices import default_batch_tokens
from workers.inference.engine import Inference
from workers.inference.feed import Feed
from workers.inference.model_manager import Loaded
from workers.inference.rerank import CrossEncoderBatchExecutor, load_cross_encoder, pairs_feed

WORDS = ["flow", "wedge", "layer", "plate", "heat", "shock", "wave", "nozzle", "drag", "lift"]

QUERY = "heat transfer in a turbulent boundary layer"


@pytest.fixture(scope="module")
def inference() -> Inference:
    """The models of a worker process (the tests' own)."""
    return Inference()


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory, inference: Inference) -> Loaded:
    folder = build_tiny_cross_encoder(tmp_path_factory.mktemp("models") / "tiny-ce")
    return load_cross_encoder(inference, str(folder), "cpu")


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    """Pairs of 1 to 60-word passages in shuffled order (input order != longest first)."""
    rng = random.Random(7)
    passages = [" ".join(rng.choices(WORDS, k=n)) for n in range(1, 61)]
    rng.shuffle(passages)
    return [(QUERY, passage) for passage in passages]


def feed_of(
    inference: Inference,
    reranker: Loaded,
    pairs: list[tuple[str, str]],
    lengths: list[int] | None = None,
) -> Feed:
    """The pairs' feed (tokenized with the model's tokenizer); ``lengths``: what batches
    are cut by, set by the test."""
    feed = pairs_feed(inference, reranker.model, reranker.info.name, pairs)
    return dataclasses.replace(feed, lengths=lengths) if lengths is not None else feed


@pytest.fixture(scope="module")
def feed(inference: Inference, reranker: Loaded, pairs: list[tuple[str, str]]) -> Feed:
    return feed_of(inference, reranker, pairs)


@pytest.fixture(scope="module")
def lengths(feed: Feed) -> list[int]:
    return feed.lengths


@pytest.fixture()
def part(inference: Inference, reranker: Loaded, pairs: list[tuple[str, str]]) -> Any:
    """The feed of the first ``n`` pairs, their batches cut by ``lengths``."""

    def make(n: int, lengths: list[int] | None = None) -> Feed:
        return feed_of(inference, reranker, pairs[:n], lengths)

    return make


@pytest.fixture(scope="module")
def bare(reranker: Loaded, pairs: list[tuple[str, str]]) -> np.ndarray[Any, Any]:
    """What the plain CrossEncoder says, in one call with its own batching."""
    return np.asarray(reranker.model.predict(pairs, show_progress_bar=False))


class Wrapped:
    """A CrossEncoder as the executor sees it: its forward pass, and the rest of it."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, features: dict[str, Any], **kwargs: Any) -> Any:
        return self.model(features, **kwargs)


class OomAbove(Wrapped):
    """A CrossEncoder that runs out of memory on batches of more than ``max_pairs``."""

    def __init__(self, model: Any, max_pairs: int | None) -> None:
        super().__init__(model)
        self.max_pairs = max_pairs
        self.sizes: list[int] = []

    def __call__(self, features: dict[str, Any], **kwargs: Any) -> Any:
        pairs = int(features["input_ids"].shape[0])
        if self.max_pairs is not None and pairs > self.max_pairs:
            raise torch.cuda.OutOfMemoryError("simulated")
        self.sizes.append(pairs)
        return self.model(features, **kwargs)


class Raising(Wrapped):
    """A CrossEncoder with a bug: every call raises a plain RuntimeError."""

    def __call__(self, features: dict[str, Any], **kwargs: Any) -> Any:
        raise RuntimeError("boom")


class Reshaped(Wrapped):
    """A CrossEncoder whose scores come out [n, columns] instead of [n, 1]."""

    def __init__(self, model: Any, columns: int) -> None:
        super().__init__(model)
        self.columns = columns

    def __call__(self, features: dict[str, Any], **kwargs: Any) -> Any:
        out = self.model(features, **kwargs)
        out["scores"] = out["scores"].reshape(-1, 1).repeat(1, self.columns)
        return out


def sleeper(seconds: float, when: Any = None) -> Any:
    """A before_batch hook that sleeps ``seconds`` for the batches ``when`` selects."""

    def hook(indices: list[int]) -> None:
        if when is None or when(indices):
            time.sleep(seconds)

    return hook


def assert_alarm_untouched(handler_before: Any) -> None:
    assert signal.getsignal(signal.SIGALRM) is handler_before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


# --- loading and lengths ---------------------------------------------------------------


def test_load_once_with_model_info(reranker: Loaded, inference: Inference) -> None:
    info = reranker.info
    assert info.kind == "rerank"
    assert info.source == "path"
    assert info.revision.startswith("sha256:")
    assert (info.dim, info.dtype, info.device, info.max_seq_length) == (1, "float32", "cpu", 512)
    assert load_cross_encoder(inference, info.name, "cpu").model is reranker.model


def test_default_budgets() -> None:
    assert default_batch_tokens("rerank", "cpu") == 4096
    assert default_batch_tokens("rerank", "cuda:1") == 32768
    assert default_batch_tokens("rerank", "mps") == 4096


def test_pair_lengths_are_what_the_model_sees(
    inference: Inference, reranker: Loaded, feed: Feed
) -> None:
    """A pair's ids (and so its length) are laid out as the model's own tokenizer lays
    them out: the query tokenized once, the passage truncated longest-first at the
    model's limit, an empty passage still closed by its [SEP]."""
    passages = ["x", "supersonic flow over a wedge", " ".join(WORDS * 100), ""]
    pairs = [(QUERY, p) for p in passages] + [(" ".join(WORDS * 80), "a short passage")]
    feed = feed_of(inference, reranker, pairs)
    assert feed.source == "tokenized" and feed.tokenized == len(set(passages) | {"a short passage"})
    features = reranker.model.preprocess([list(pair) for pair in pairs])
    assert feed.lengths == features["attention_mask"].sum(dim=1).tolist()
    assert max(feed.lengths) == reranker.info.max_seq_length
    mine = feed.features(reranker.model, list(range(len(pairs))), "cpu")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(mine[key], features[key]), key


# --- scores and batching ---------------------------------------------------------------


def test_scores_equal_bare_predict_in_input_order(
    reranker: Loaded,
    pairs: list[tuple[str, str]],
    lengths: list[int],
    bare: np.ndarray[Any, Any],
    feed: Feed,
) -> None:
    assert lengths != sorted(lengths, reverse=True)  # batches are cut in another order
    budget = 512
    groups: list[list[int]] = []
    executor = CrossEncoderBatchExecutor(reranker.model, "cpu", budget, before_batch=groups.append)
    scores, stats = executor.score(feed)
    assert all(isinstance(s, float) for s in scores)
    np.testing.assert_allclose(np.array(scores, dtype=np.float64), bare, rtol=0, atol=1e-5)
    assert np.ptp(bare) > 0.05  # scores differ enough for the order check to mean something
    assert len(groups) > 1
    assert groups[0][0] == max(range(len(lengths)), key=lambda i: (lengths[i], -i))
    for group in groups:
        assert len(group) * max(lengths[i] for i in group) <= budget or len(group) == 1
    assert stats.pairs_asked == stats.pairs_scored == len(pairs)
    assert stats.batch_sizes == [len(g) for g in groups]
    assert (stats.oom_count, stats.timeout_count, stats.fallbacks) == (0, 0, {})
    assert stats.max_batch_tokens == budget


@pytest.mark.parametrize("columns", [1, 2])
def test_column_output(
    reranker: Loaded,
    pairs: list[tuple[str, str]],
    lengths: list[int],
    bare: np.ndarray[Any, Any],
    columns: int,
    feed: Feed,
) -> None:
    executor = CrossEncoderBatchExecutor(Reshaped(reranker.model, columns), "cpu", 4096)
    if columns == 1:
        scores, _ = executor.score(feed)
        np.testing.assert_allclose(np.array(scores, dtype=np.float64), bare, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="one score per pair"):
            executor.score(feed)


# --- out of memory -----------------------------------------------------------------------


def test_oom_shrinks_then_grows_back(
    reranker: Loaded,
    pairs: list[tuple[str, str]],
    lengths: list[int],
    bare: np.ndarray[Any, Any],
    feed: Feed,
) -> None:
    limit = 4
    model = OomAbove(reranker.model, max_pairs=limit)
    executor = CrossEncoderBatchExecutor(model, "cuda", 4096, grow_after=2)
    scores, stats = executor.score(feed)
    assert stats.pairs_scored == stats.pairs_asked == len(pairs)  # coverage 1.0
    assert stats.oom_count > 0
    assert stats.batch_sizes == model.sizes
    assert max(stats.batch_sizes) <= limit
    assert stats.fallbacks == {}
    np.testing.assert_allclose(np.array(scores, dtype=np.float64), bare, rtol=0, atol=1e-5)
    shrunk = stats.max_batch_tokens
    assert shrunk == executor.budget < 4096

    # The device has memory again: every grow_after good batches the budget doubles,
    # up to the initial budget and no further.
    model.max_pairs = None
    budgets = [shrunk]
    for _ in range(6):
        scores, stats = executor.score(feed)
        assert stats.oom_count == 0
        assert stats.pairs_scored == len(pairs)
        budgets.append(stats.max_batch_tokens)
    assert budgets[1] > shrunk
    assert budgets == sorted(budgets)
    assert budgets[-1] == executor.budget == 4096
    np.testing.assert_allclose(np.array(scores, dtype=np.float64), bare, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_oom_on_a_single_pair_falls_back(
    reranker: Loaded,
    pairs: list[tuple[str, str]],
    lengths: list[int],
    bare: np.ndarray[Any, Any],
    device: str,
    part: Any,
) -> None:
    """A device that cannot fit even one pair: the CPU model scores them (if any)."""
    calls: list[int] = []

    def cpu_model() -> Any:
        calls.append(1)
        return reranker.model

    subset = pairs[:6]
    executor = CrossEncoderBatchExecutor(
        OomAbove(reranker.model, max_pairs=0), device, 4096, cpu_model=cpu_model
    )
    scores, stats = executor.score(part(6))
    assert stats.oom_count > 0
    if device == "cuda":
        assert calls == [1]  # the CPU copy is built once, on first use
        assert stats.pairs_scored == len(subset)
        assert stats.fallbacks == {"cpu": len(stats.batch_sizes)}
        np.testing.assert_allclose(np.array(scores, dtype=np.float64), bare[:6], atol=1e-5)
    else:
        assert calls == []  # a CPU executor has no CPU fallback
        assert scores == [None] * len(subset)
        assert stats.pairs_scored == 0
        assert stats.fallbacks["unreranked"] > 0


def test_other_runtime_errors_propagate(reranker: Loaded, feed: Feed) -> None:
    handler = signal.getsignal(signal.SIGALRM)
    executor = CrossEncoderBatchExecutor(
        Raising(reranker.model), "cuda", 4096, time_limit_s=5.0, cpu_model=lambda: None
    )
    with pytest.raises(RuntimeError, match="boom"):
        executor.score(feed)
    assert_alarm_untouched(handler)


# --- time limits ---------------------------------------------------------------------------

# With a budget of 64: batches of exactly 4 pairs (16 wide: a multiple of the padding's
# multiple on a CPU and a GPU, so the batches are cut by these lengths as they are).
UNIFORM = [16] * 12


def test_timeout_splits_the_batch(
    reranker: Loaded, pairs: list[tuple[str, str]], bare: np.ndarray[Any, Any], part: Any
) -> None:
    handler = signal.getsignal(signal.SIGALRM)
    executor = CrossEncoderBatchExecutor(
        reranker.model,
        "cpu",
        64,
        time_limit_s=0.2,
        before_batch=sleeper(0.5, when=lambda indices: len(indices) > 2),
    )
    started = time.monotonic()
    scores, stats = executor.score(part(12, UNIFORM))
    assert time.monotonic() - started < 3.0  # interrupted at 0.2 s, not slept out
    assert stats.pairs_scored == 12
    assert stats.timeout_count == 3
    assert stats.fallbacks == {"split": 3}
    assert stats.batch_sizes == [2] * 6
    np.testing.assert_allclose(np.array(scores, dtype=np.float64), bare[:12], atol=1e-5)
    assert_alarm_untouched(handler)


def test_timeout_everywhere_leaves_pairs_unreranked(
    reranker: Loaded, pairs: list[tuple[str, str]], part: Any
) -> None:
    handler = signal.getsignal(signal.SIGALRM)
    executor = CrossEncoderBatchExecutor(
        reranker.model, "cpu", 64, time_limit_s=0.2, before_batch=sleeper(0.5)
    )
    scores, stats = executor.score(part(4, UNIFORM[:4]))
    assert scores == [None] * 4
    assert stats.pairs_scored / stats.pairs_asked < 1
    assert stats.pairs_scored == 0
    assert stats.fallbacks == {"split": 1, "unreranked": 2}
    assert stats.timeout_count == 3
    assert stats.batch_sizes == []
    assert_alarm_untouched(handler)


def test_timeout_of_one_half_costs_only_that_half(
    reranker: Loaded, pairs: list[tuple[str, str]], bare: np.ndarray[Any, Any], part: Any
) -> None:
    executor = CrossEncoderBatchExecutor(
        reranker.model,
        "cpu",
        64,
        time_limit_s=0.2,
        before_batch=sleeper(0.5, when=lambda indices: 0 in indices),
    )
    scores, stats = executor.score(part(8, UNIFORM[:8]))
    assert stats.pairs_scored == 6
    missing = [i for i, s in enumerate(scores) if s is None]
    assert 0 in missing and len(missing) == 2
    assert stats.fallbacks == {"split": 1, "unreranked": 1}
    kept = [i for i in range(8) if i not in missing]
    np.testing.assert_allclose([scores[i] for i in kept], bare[kept], atol=1e-5)


def test_timeout_falls_back_to_the_cpu_model(
    reranker: Loaded, pairs: list[tuple[str, str]], bare: np.ndarray[Any, Any], part: Any
) -> None:
    executor: CrossEncoderBatchExecutor | None = None

    def slow_on_device(indices: list[int]) -> None:
        assert executor is not None
        if executor.current_device != "cpu":
            time.sleep(0.5)

    executor = CrossEncoderBatchExecutor(
        reranker.model,
        "cuda",
        64,
        time_limit_s=0.2,
        cpu_model=lambda: reranker.model,
        before_batch=slow_on_device,
    )
    scores, stats = executor.score(part(4, UNIFORM[:4]))
    assert stats.pairs_scored == 4
    assert stats.fallbacks == {"split": 1, "cpu": 2}
    assert stats.timeout_count == 3
    assert stats.batch_sizes == [2, 2]
    np.testing.assert_allclose(np.array(scores, dtype=np.float64), bare[:4], atol=1e-5)


def test_slow_cpu_fallback_leaves_pairs_unreranked(
    reranker: Loaded, pairs: list[tuple[str, str]], part: Any
) -> None:
    executor = CrossEncoderBatchExecutor(
        reranker.model,
        "cuda",
        64,
        time_limit_s=0.2,
        cpu_model=lambda: reranker.model,
        before_batch=sleeper(0.5),
    )
    scores, stats = executor.score(part(4, UNIFORM[:4]))
    assert scores == [None] * 4
    assert stats.fallbacks == {"split": 1, "unreranked": 2}
    assert stats.timeout_count == 5  # the batch, both halves, both CPU tries


def test_off_the_main_thread_slow_batches_are_counted_and_kept(
    reranker: Loaded, pairs: list[tuple[str, str]], bare: np.ndarray[Any, Any], part: Any
) -> None:
    handler = signal.getsignal(signal.SIGALRM)
    executor = CrossEncoderBatchExecutor(
        reranker.model, "cpu", 64, time_limit_s=0.1, before_batch=sleeper(0.2)
    )
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(executor.score(part(8, UNIFORM[:8]))))
    thread.start()
    thread.join(timeout=30)
    scores, stats = result[0]
    assert stats.pairs_scored == 8
    assert stats.timeout_count == 2
    assert stats.fallbacks == {}
    np.testing.assert_allclose(np.array(scores, dtype=np.float64), bare[:8], atol=1e-5)
    assert_alarm_untouched(handler)


def test_previous_alarm_is_restored(
    reranker: Loaded, pairs: list[tuple[str, str]], part: Any
) -> None:
    fired: list[int] = []

    def previous(signum: int, frame: Any) -> None:
        fired.append(signum)

    old = signal.signal(signal.SIGALRM, previous)
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        executor = CrossEncoderBatchExecutor(reranker.model, "cpu", 4096, time_limit_s=2.0)
        executor.score(part(4, UNIFORM[:4]))
        assert signal.getsignal(signal.SIGALRM) is previous
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 3.0 < remaining <= 5.0

        # A previous timer that falls due during a batch fires right after it.
        slow = CrossEncoderBatchExecutor(
            reranker.model, "cpu", 4096, time_limit_s=2.0, before_batch=sleeper(0.2)
        )
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        _, stats = slow.score(part(4, UNIFORM[:4]))
        time.sleep(0.05)
        assert stats.timeout_count == 0
        assert fired == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_invalid_settings_rejected(reranker: Loaded) -> None:
    for kwargs in ({"time_limit_s": 0.0}, {"grow_after": 0}):
        with pytest.raises(ValueError):
            CrossEncoderBatchExecutor(reranker.model, "cpu", 4096, **kwargs)
    with pytest.raises(ValueError):
        CrossEncoderBatchExecutor(reranker.model, "cpu", 0)


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_cross_encoder(tmp_path / "a", seed=3)
    b = build_tiny_cross_encoder(tmp_path / "b", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()


def test_auto_probes_the_first_real_batch(tmp_path: Path, monkeypatch: Any) -> None:
    """``auto`` times the batch the executor runs first (the longest pairs, as many as
    the budget holds), not a fixed handful of pairs: a small probe can favour a dtype
    that loses at full batch size."""
    from shared.records.schemas import Candidate, FusedGroup, QueryCandidates
    from workers.inference.batch_runner import first_batch
    from workers.inference.rerank import RERANK, rerank_fused

    folder = build_tiny_cross_encoder(tmp_path / "tiny-ce")
    rng = random.Random(3)
    texts = {f"d{i}#0": " ".join(rng.choices(WORDS, k=rng.randint(1, 60))) for i in range(60)}
    queries = [
        QueryCandidates(
            query_id=f"q{n}",
            text=f"{QUERY} {n}",
            candidates=[
                Candidate(
                    chunk_id=c,
                    doc_id=c[:-2],
                    dense_score=None,
                    sparse_score={},
                    fused_score=1.0,
                    rank=r,
                )
                for r, c in enumerate(texts, start=1)
            ],
        )
        for n in range(3)
    ]
    group = FusedGroup(job_id="j", group_id="q-g00000", queries=queries, texts=texts)
    inference = Inference()
    probes: list[list[Any]] = []
    get = inference.models.get

    def spy(*args: Any, **kwargs: Any) -> Loaded:
        probes.append(list(args[4]))
        return get(*args, **kwargs)

    monkeypatch.setattr(inference.models, "get", spy)
    rerank_fused(inference, [group], str(folder), 60, "fp32")
    staged = inference.models.stage(RERANK, str(folder), "cpu", "fp32").model
    pairs = [(q.text, texts[c.chunk_id]) for q in queries for c in q.candidates]
    lengths = pairs_feed(inference, staged, str(folder.resolve()), pairs).lengths
    expected = first_batch(pairs, lengths, default_batch_tokens("rerank", "cpu"))
    assert probes == [expected]
    assert 32 < len(expected) < len(pairs)

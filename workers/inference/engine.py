"""What running models needs in one worker process, built once and kept for its life.

The worker context (:mod:`workers.runtime.context`) builds one :class:`Inference` per
process and hands it to every task; tests build their own. It holds the process's
:class:`~workers.inference.model_manager.ModelManager`, the token budgets it has learned
(:class:`~workers.inference.batch_runner.BudgetBook`), the device its dense and rerank
work runs on, the settings that shape a batch run, and the per-model things that are
built once (SPLADE vocabularies, rerank executors).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared.control.settings import Settings
from workers.inference.batch_runner import BatchRunner, BudgetBook
from workers.inference.devices import default_batch_tokens, worker_device
from workers.inference.model_manager import ModelManager


@dataclass
class Inference:
    """A worker process's models, learned budgets and device.

    Attributes:
        requested_device: Where dense and rerank models run: the leased GPU or a forced
            device; ``None``: CUDA when present, else the CPU (decided on first use, so
            a worker that never runs a model never imports torch).
        models: Every model of the process, staged and hydrated on demand.
        budgets: The padded-token budget learned per (stage, model, device).
        rerank_timeout_s: Seconds one CrossEncoder batch may run (``None``: no limit).
        simulate_oom_tokens: The out-of-memory test hook (``None``: off).
        cache: Things built once per model and process (SPLADE vocabularies, rerank
            executors), by :meth:`once`.
    """

    requested_device: str | None = None
    models: ModelManager = field(default_factory=ModelManager)
    budgets: BudgetBook = field(default_factory=BudgetBook)
    rerank_timeout_s: float | None = 120.0
    simulate_oom_tokens: int | None = None
    cache: dict[tuple[str, ...], Any] = field(default_factory=dict)

    @functools.cached_property
    def device(self) -> str:
        """Where dense and rerank models run."""
        return worker_device(self.requested_device)

    @classmethod
    def from_settings(cls, settings: Settings, device: str | None) -> Inference:
        return cls(
            requested_device=device,
            models=ModelManager(
                memory=settings.model_memory, speed_verdicts=settings.speed_verdicts
            ),
            rerank_timeout_s=settings.rerank_batch_timeout,
            simulate_oom_tokens=settings.simulate_oom_tokens,
        )

    def runner(
        self,
        stage: str,
        model: str,
        device: str,
        ceiling: int | None = None,
        **options: Any,
    ) -> BatchRunner:
        """A :class:`BatchRunner` for one model on one device, with the process's learned
        budget for it (started at ``ceiling``, default the device's)."""
        budget = self.budgets.get(
            stage, model, device, ceiling or default_batch_tokens(stage, device)
        )
        return BatchRunner(
            stage, model, device, budget, simulate_oom_tokens=self.simulate_oom_tokens, **options
        )

    def once(self, key: tuple[str, ...], build: Callable[[], Any]) -> Any:
        """``build()`` the first time ``key`` is asked for, the same object after."""
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]

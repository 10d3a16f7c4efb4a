"""ModelManager: every model a worker uses, staged on the CPU and hydrated on demand.

One manager per worker process holds the dense, sparse and rerank models alike:

- **Staged**: loaded from the one shared model cache (``HF_HOME``, or the folder given
  to ``--model-cache``; see :func:`shared.inputs.models.resolve_model`) into CPU memory, at
  worker start for the models named in ``EMBED_FLEET_PRELOAD`` (:mod:`workers.runtime.preload`)
  and otherwise on first use. Loading from disk is the slow part (seconds); it happens once.
- **Hydrated**: moved to the worker's device (the leased GPU) when a task of its stage
  arrives, and put in the dtype the policy picks there (:mod:`workers.inference.precision`, whose
  bf16 probe must run on the device that will run the model).
- **Evicted**: when hydrating a model would take the device's models over the memory
  budget (``EMBED_FLEET_MODEL_MEMORY``, default half of the GPU), the least recently
  used models go back to the CPU first; hydrating them again is a copy, not a load.

On a CPU-only worker the CPU is both the staging place and the device: models simply
stay where they are, unless ``EMBED_FLEET_MODEL_MEMORY`` is set, in which case an
evicted model is released and staged again from the cache when it is needed, so the
budget bounds the worker's memory there too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import numpy as np

from shared.inputs.models import ResolvedModel, canonical_name, resolve_model
from shared.inputs.tokens import tokenizer_identity
from shared.records.content_keys import model_key
from shared.records.logs import get_logger
from shared.records.schemas import ModelInfo
from workers.inference.devices import prepare_cuda
from workers.inference.precision import (
    MAX_PROBE_ITEMS,
    QUALITY_PROBE_ITEMS,
    Precision,
    SpeedVerdicts,
    apply_precision,
    parameter_count,
    verdict_key,
)

log = get_logger("models")

ModelKind = Literal["dense", "sparse", "rerank"]
# Share of a GPU's memory the models may take when no budget is set; the rest is for
# activations, whose size the batch budgets (workers.inference.batch_runner) adapt to.
DEFAULT_GPU_SHARE = 0.5


@dataclass(frozen=True)
class ModelFamily:
    """How to load, probe and describe one kind of model.

    Attributes:
        kind: ``dense``, ``sparse`` or ``rerank``.
        load: Builds the model from its folder on a device (``SentenceTransformer``,
            ``SparseEncoder``, ``CrossEncoder``).
        probe: Runs the model on probe items; its output decides whether ``auto``
            may keep bf16.
        agree: Whether reduced-precision probe output is close enough to fp32's.
        dim: The model's output width, for the manifest.
        max_seq_length: Tokens the model truncates an input to.
        default_probe: Probe items when the caller has none.
    """

    kind: ModelKind
    load: Callable[[str, str], Any]
    probe: Callable[[Any, list[Any]], np.ndarray[Any, Any]]
    agree: Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any]], tuple[bool, str]]
    dim: Callable[[Any], int]
    max_seq_length: Callable[[Any], int]
    default_probe: tuple[Any, ...] = ("a probe sentence",)


@dataclass
class ManagedModel:
    """One model of the worker and where it is now.

    Attributes:
        model: The model object (``None`` while released on a CPU-only worker).
        info: What the manifest records (set at first hydration, with the dtype).
        device: The device it runs on when hydrated.
        resident: Whether it is on ``device`` now.
        bytes: Its parameters and buffers, in the dtype it runs in.
    """

    family: ModelFamily
    resolved: ResolvedModel
    dtype_request: str
    device: str
    model: Any = None
    info: ModelInfo | None = None
    precision: Precision | None = None
    resident: bool = False
    bytes: int = 0
    last_used: float = 0.0

    @property
    def name(self) -> str:
        return self.resolved.name


@dataclass(frozen=True)
class Loaded:
    """A hydrated model and its manifest entry, as :meth:`ModelManager.get` returns it."""

    model: Any
    info: ModelInfo


class Activity(TypedDict):
    """What a manager did while one unit ran."""

    model_loads: int
    hydrations: int
    evictions: int


@dataclass
class ManagerStats:
    """Counters of one process's manager; each unit of work reports what changed
    while it ran (``model_loads``, ``hydrations``, ``evictions`` of its report)."""

    loads: int = 0
    hydrations: int = 0
    evictions: int = 0

    def snapshot(self) -> tuple[int, int, int]:
        return (self.loads, self.hydrations, self.evictions)

    def since(self, before: tuple[int, int, int] | None) -> Activity:
        """The counters' growth since ``before`` (all of it when ``None``), named as a
        unit's report names them."""
        loads, hydrations, evictions = before or (0, 0, 0)
        return Activity(
            model_loads=self.loads - loads,
            hydrations=self.hydrations - hydrations,
            evictions=self.evictions - evictions,
        )


class ModelManager:
    """The worker's models, staged on the CPU and hydrated on demand (see module doc).

    Thread-safe: one lock around the bookkeeping and moves (a worker process runs one
    task at a time, so the lock is never contended in practice).
    """

    def __init__(
        self,
        budgets: dict[str, int | None] | None = None,
        memory: int | None = None,
        speed_verdicts: str | None = None,
    ) -> None:
        """Args:
        budgets: Memory budget per device kind (``cuda``, ``cpu``), for tests.
        memory: The budget on any device (``EMBED_FLEET_MODEL_MEMORY``); ``None``:
            half a GPU, no limit on the CPU.
        speed_verdicts: The file of ``auto``'s speed verdicts
            (``EMBED_FLEET_SPEED_VERDICTS``); ``None``: beside the model cache.
        """
        self._budgets = budgets or {}
        self._memory = memory
        self._models: dict[tuple[str, str, str, str], ManagedModel] = {}
        self._lock = threading.RLock()
        self.stats = ManagerStats()
        # ``auto``'s speed verdicts, kept per host (see workers.inference.precision).
        self.speed_verdicts = (
            SpeedVerdicts(Path(speed_verdicts)) if speed_verdicts else SpeedVerdicts.default()
        )

    # -- the one call tasks make ---------------------------------------------------------

    def get(
        self,
        family: ModelFamily,
        name: str,
        device: str,
        dtype: str = "auto",
        probe: list[Any] | None = None,
    ) -> Loaded:
        """The model, hydrated on ``device`` in the policy's dtype.

        Args:
            family: How to load and probe it.
            name: A hub id, an alias or a folder.
            device: Where it should run (``cpu``, ``cuda:0``).
            dtype: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
            probe: Items for the ``auto`` probe (the first model batch about to run, at
                its real shape: :func:`~workers.inference.batch_runner.first_batch`),
                used at first hydration only.
        """
        with self._lock:
            entry = self.stage(family, name, device, dtype)
            if not entry.resident:
                self._hydrate(entry, probe)
            entry.last_used = time.monotonic()
            assert entry.info is not None, "set by the first hydration"
            return Loaded(entry.model, entry.info)

    def stage(self, family: ModelFamily, name: str, device: str, dtype: str) -> ManagedModel:
        """Load a model into CPU memory (once); hydration comes later."""
        with self._lock:
            key = (family.kind, canonical_name(name), device, dtype)
            entry = self._models.get(key)
            if entry is None:
                entry = ManagedModel(family, resolve_model(name), dtype, device)
                self._models[key] = entry
            if entry.model is None:
                entry.model = self._load(entry)
            return entry

    def resident(self, device: str | None = None) -> list[str]:
        """``kind:name`` of the models on ``device`` (every device when ``None``), most
        recently used last."""
        entries = sorted(
            (e for e in self._models.values() if e.resident),
            key=lambda e: e.last_used,
        )
        return [
            f"{e.family.kind}:{e.name}" for e in entries if device is None or e.device == device
        ]

    def budget(self, device: str) -> int | None:
        """The memory budget of the models on ``device``, in bytes (None: no limit)."""
        kind = device.split(":")[0]
        if kind in self._budgets:
            return self._budgets[kind]
        if self._memory is not None:
            return self._memory
        if kind == "cuda":
            import torch

            total = torch.cuda.get_device_properties(device).total_memory
            return int(total * DEFAULT_GPU_SHARE)
        return None

    # -- staging, hydration, eviction ------------------------------------------------------

    def _load(self, entry: ManagedModel) -> Any:
        started = time.perf_counter()
        model = load_model(entry.family, entry.resolved, "cpu")
        if entry.precision is not None:  # staged again after a release: dtype known
            self._set_dtype(model, entry.precision.dtype)
        self.stats.loads += 1
        fields = {"model": entry.name, "kind": entry.family.kind}
        fields["load_s"] = round(time.perf_counter() - started, 2)  # type: ignore[assignment]
        log.info("model staged on cpu", extra={"fields": fields})
        return model

    def _hydrate(self, entry: ManagedModel, probe: list[Any] | None) -> None:
        incoming = entry.bytes or model_bytes(entry.model)
        self._make_room(entry.device, incoming, keep=entry)
        if entry.model is None:
            entry.model = self._load(entry)
        prepare_cuda(entry.device)
        entry.model.to(entry.device)
        if entry.precision is None:
            self._first_hydration(entry, probe)
        entry.bytes = model_bytes(entry.model)
        entry.resident = True
        self.stats.hydrations += 1
        fields = {"model": entry.name, "device": entry.device, "bytes": entry.bytes}
        log.info("model hydrated", extra={"fields": fields})

    def _first_hydration(self, entry: ManagedModel, probe: list[Any] | None) -> None:
        family = entry.family
        items = list(probe or family.default_probe)[:MAX_PROBE_ITEMS]

        def run_probe(model: Any) -> np.ndarray[Any, Any]:
            return family.probe(model, items)

        def run_quality_probe(model: Any) -> np.ndarray[Any, Any]:
            return family.probe(model, items[:QUALITY_PROBE_ITEMS])

        def reload() -> Any:
            return load_model(family, entry.resolved, entry.device)

        resolved = entry.resolved
        model, precision = apply_precision(
            entry.model,
            entry.dtype_request,
            entry.device,
            run_probe,
            family.agree,
            reload,
            verdicts=self.speed_verdicts,
            key=verdict_key(resolved.name, resolved.revision, entry.device, entry.dtype_request),
            quality_probe=run_quality_probe,
        )
        entry.model = model
        entry.precision = precision
        tokenizer = tokenizer_of(model)
        entry.info = ModelInfo(
            name=entry.resolved.name,
            source=entry.resolved.source,
            revision=entry.resolved.revision,
            dim=family.dim(model),
            dtype=precision.dtype,
            device=str(getattr(model, "device", entry.device)),
            max_seq_length=family.max_seq_length(model),
            kind=family.kind,
            dtype_reason=precision.reason,
            parameters=parameter_count(model),
            tokenizer=tokenizer,
            key=model_key(resolved.name, resolved.revision, tokenizer, precision.dtype),
        )

    def _make_room(self, device: str, incoming: int, keep: ManagedModel) -> None:
        """Evict the least recently used models of ``device`` until ``incoming`` fits."""
        budget = self.budget(device)
        if budget is None:
            return
        on_device = sorted(
            (e for e in self._models.values() if e.resident and e.device == device),
            key=lambda e: e.last_used,
        )
        on_device = [e for e in on_device if e is not keep]
        used = sum(e.bytes for e in on_device)
        for victim in on_device:
            if used + incoming <= budget:
                break
            self._evict(victim)
            used -= victim.bytes
        if used + incoming > budget:
            fields = {"device": device, "bytes": incoming, "budget": budget}
            log.warning("model over the memory budget; hydrated anyway", extra={"fields": fields})

    def _evict(self, entry: ManagedModel) -> None:
        if entry.device.split(":")[0] == "cpu":
            entry.model = None  # the CPU is its device: release it, stage again later
        else:
            entry.model.to("cpu")
            if entry.device.startswith("cuda"):
                import torch

                torch.cuda.empty_cache()
        entry.resident = False
        self.stats.evictions += 1
        fields = {"model": entry.name, "device": entry.device, "bytes": entry.bytes}
        log.info("model evicted", extra={"fields": fields})

    @staticmethod
    def _set_dtype(model: Any, dtype: str) -> None:
        import torch

        if dtype != "float32":
            model.to(getattr(torch, dtype))


def load_model(family: ModelFamily, resolved: ResolvedModel, device: str) -> Any:
    """A model from its folder, as its family loads it, in eval mode, with its attention
    mask made by broadcasting (:mod:`workers.inference.attention_mask`): the same
    outputs, without a batch x length x length gather per padded batch.

    Eval mode because the fleet calls the model's forward itself, and only ``encode`` and
    ``predict`` switch it: sentence-transformers loads its wrapper modules in training
    mode (the transformer inside is in eval). SPLADE's pooling then took its training
    path, a copy of the batch x length x vocabulary logits for each ``log1p`` instead
    of working in place: 2.2 s more of 21.6 s for seven Cranfield units in bf16, and
    that tensor's memory again at every batch's peak."""
    # torch at import: only a worker that loads a model pays for it (an aggregator
    # imports this module too, and never needs torch).
    from workers.inference.attention_mask import use_broadcast_mask

    model = family.load(str(resolved.path), device)
    model.eval()
    use_broadcast_mask(model)
    return model


def model_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers in their current dtype."""
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def tokenizer_of(model: Any) -> str:
    """The identity of a loaded model's tokenizer (``""`` for one without a Rust
    tokenizer, whose ids the fleet cannot vouch for)."""
    backend = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
    return tokenizer_identity(backend) if backend is not None else ""

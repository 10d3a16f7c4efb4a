"""The compute dtype policy: ``--dtype auto|fp32|bf16|fp16``, per model and device.

``auto`` picks bf16 only where the hardware runs it natively: CUDA compute capability 8
(Ampere) or newer, or a CPU with AMX or AVX512-BF16. Elsewhere bf16 is emulated and
slower than fp32 (measured on this project's AVX2-only AMD EPYC: all-MiniLM-L6-v2 took
4.7x *longer* in bf16), so ``auto`` keeps fp32 there.

``auto`` must also keep quality and pay off: before switching a model, the worker
runs a probe, the first model batch it is about to run at its real shape (the longest
items, as many as the token budget holds; see
:func:`~workers.inference.batch_runner.first_batch`), in fp32 and in bf16, and keeps
bf16 only if every probe vector's cosine to its fp32 twin is at least
:data:`MIN_PROBE_COSINE` (for a reranker: every score within :data:`MAX_SCORE_DRIFT`)
and the probe ran faster in bf16. The probe used to be 32 items: on an H200 such a
probe timed a MiniLM-shaped cross-encoder faster in bf16 while whole runs, at the
budget's ~110 pairs a batch, scored 0.35x as many pairs/s as fp32 (see
``bench/gpu_fleet.py``). Otherwise the model is reloaded in fp32 and the reason is
recorded in the manifest.

The speed half of that decision is kept per host (:class:`SpeedVerdicts`, a small file
in the model cache, or where ``EMBED_FLEET_SPEED_VERDICTS`` says; the tests keep their
own): a probe timed while other stages share the cores is noise, and on this project's
2-core machine it made SPLADE bf16 in one run of the same demo and fp32
in the next. The first probe of a model, dtype and device on a host decides; later
workers and runs on that host reuse its verdict (the quality half is probed every time,
on the probe's :data:`QUALITY_PROBE_ITEMS` longest items, which is cheap and exact).
Delete the file to measure again.

A CPU probe shorter than :data:`MIN_KEPT_CPU_PROBE_MS` (a small job's first batch: a
few short texts) is not kept, nor reused from the file: at that length the timing is
Python's overhead and the neighbours' noise, not the kernels'. Measured here: a test's
40-document job timed MiniLM at 14.8 ms in fp32 and 15.5 in bf16, and that verdict
made every later ``auto`` job on the host run MiniLM in fp32, which ran 1.8x slower
than bf16 on full batches. Such a probe still decides for its own load.
Vectors are exported as float32 whatever the compute dtype.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

DTypeChoice = Literal["auto", "fp32", "bf16", "fp16"]
DTYPE_CHOICES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# bf16 all-MiniLM-L6-v2 vectors are >= 0.996 cosine to fp32 (measured); a model below
# 0.99 on its probe is one whose ranking would move.
MIN_PROBE_COSINE = 0.99
# Reranker scores (sigmoid, 0..1) that drift more than this reorder candidates.
MAX_SCORE_DRIFT = 0.02
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# At most this many items (texts or pairs) in a probe: one real batch is far fewer on
# any budget the fleet uses; the cap only bounds a caller's mistake.
MAX_PROBE_ITEMS = 4096
# Once a host's speed verdict is known, only the quality half is probed: on this many
# of the probe's items, its longest (the ones bf16 rounding moves most). Probing a
# whole first batch twice for it cost the demo's CPU workers 1.8 s (MiniLM) and 3.9 s
# (SPLADE) before their first batch, in a job whose cores were already all busy.
QUALITY_PROBE_ITEMS = 16
# A CPU probe's slower run must take this long for its speed verdict to be kept (see
# the module doc); a full batch of any real model at the CPU's budget takes longer.
MIN_KEPT_CPU_PROBE_MS = 50.0


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: str) -> tuple[bool, str]:
    """Whether ``device`` runs bf16 natively, and why (for the manifest)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        major, minor = torch.cuda.get_device_capability(index)
        return major >= 8, f"CUDA compute capability {major}.{minor}"
    found = sorted(set(_CPU_BF16_FLAGS) & cpu_flags())
    return bool(found), ("CPU with " + ", ".join(found)) if found else "CPU without AMX/AVX512-BF16"


@dataclass(frozen=True)
class Precision:
    """The dtype a model runs in and why."""

    dtype: str  # torch's name: float32, bfloat16, float16
    reason: str


def choose(requested: str, device: str) -> Precision:
    """The dtype to try for ``requested`` on ``device`` (``auto`` still has to pass
    the probe)."""
    if requested == "auto":
        native, why = native_bf16(device)
        return Precision("bfloat16" if native else "float32", f"auto: {why}")
    if requested not in TORCH_NAMES:
        raise ValueError(f"unknown dtype {requested!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return Precision(TORCH_NAMES[requested], f"{requested} requested")


def min_cosine(reference: np.ndarray[Any, Any], other: np.ndarray[Any, Any]) -> float:
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosines = np.where(norms > 0, (a * b).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
    return float(cosines.min()) if len(cosines) else 1.0


def vectors_agree(reference: np.ndarray[Any, Any], other: np.ndarray[Any, Any]) -> tuple[bool, str]:
    value = min_cosine(reference, other)
    return value >= MIN_PROBE_COSINE, f"probe cosine min {value:.4f}"


def scores_agree(reference: np.ndarray[Any, Any], other: np.ndarray[Any, Any]) -> tuple[bool, str]:
    drift = (
        float(np.max(np.abs(np.asarray(reference) - np.asarray(other)))) if len(reference) else 0.0
    )
    return drift <= MAX_SCORE_DRIFT, f"probe score drift max {drift:.4f}"


class SpeedVerdict(msgspec.Struct):
    """How long a model's probe took in fp32 and in the reduced dtype, once."""

    fp32_ms: float
    reduced_ms: float
    measured_at: float
    host: str = ""

    def worth_keeping(self, device: str) -> bool:
        """Whether the probe was long enough to decide later loads too: a GPU's
        timing (synchronised by the copy back, on a device of its own) always is; a
        CPU's only from :data:`MIN_KEPT_CPU_PROBE_MS` on."""
        return device.startswith("cuda") or max(self.fp32_ms, self.reduced_ms) >= (
            MIN_KEPT_CPU_PROBE_MS
        )


class SpeedVerdicts:
    """Probe timings kept per host, model, dtype and device (see the module doc).

    A JSON file, read whole and replaced whole (write to a temporary file, rename), so
    two workers that measure at once leave one verdict or the other, never a torn file;
    a file that does not parse is ignored (and measured over).
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def default(cls) -> SpeedVerdicts:
        """``<HF_HOME>/embed-fleet/speed-verdicts.json``: beside the models it is about."""
        from shared.inputs.models import hf_cache_dir

        return cls(hf_cache_dir().parent / "embed-fleet" / "speed-verdicts.json")

    def _read(self) -> dict[str, SpeedVerdict]:
        try:
            return msgspec.json.decode(self.path.read_bytes(), type=dict[str, SpeedVerdict])
        except (OSError, msgspec.DecodeError):
            return {}

    def get(self, key: str) -> SpeedVerdict | None:
        return self._read().get(key)

    def put(self, key: str, verdict: SpeedVerdict) -> None:
        verdicts = self._read()
        verdicts[key] = verdict
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
            tmp.write_bytes(msgspec.json.encode(verdicts))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only cache: measure again next time


def verdict_key(model: str, revision: str, device: str, dtype: str) -> str:
    """What a verdict holds for: the model (and revision), the dtype, and the device as
    the hardware it is (a CPU's model name, a GPU's)."""
    return f"{model}@{revision}|{dtype}|{_hardware(device)}"


def _hardware(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        return f"cuda:{torch.cuda.get_device_name(index)}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu:{line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return "cpu"


def apply_precision(
    model: Any,
    requested: str,
    device: str,
    probe: Callable[[Any], np.ndarray[Any, Any]],
    agree: Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any]], tuple[bool, str]],
    reload: Callable[[], Any],
    verdicts: SpeedVerdicts | None = None,
    key: str = "",
    quality_probe: Callable[[Any], np.ndarray[Any, Any]] | None = None,
) -> tuple[Any, Precision]:
    """Put a freshly loaded (fp32) model in the dtype the policy picks.

    Args:
        model: The model, as loaded (fp32).
        requested: ``auto``, ``fp32``, ``bf16`` or ``fp16``.
        device: Where it runs.
        probe: Encodes the probe with a model (vectors or scores).
        agree: Whether reduced-precision probe output is close enough to fp32's.
        reload: Loads the model again in fp32 (converting back would keep the rounding).
        verdicts: Where the speed verdict of ``key`` is kept (none: time every time).
        key: The model's verdict key (:func:`verdict_key`).
        quality_probe: The probe's first :data:`QUALITY_PROBE_ITEMS` items, run instead
            of ``probe`` when a kept verdict leaves only the quality half to check
            (default: ``probe``).

    Returns:
        The model to use and its precision.
    """
    import torch

    target = choose(requested, device)
    if target.dtype == "float32":
        return model, target
    if requested != "auto":
        model.to(getattr(torch, target.dtype))
        return model, target
    kept = verdicts.get(key) if verdicts is not None and key else None
    if kept is not None and not kept.worth_keeping(device):
        kept = None  # an earlier short probe's noise (see the module doc): time again
    check = probe if kept is None or quality_probe is None else quality_probe
    reference, fp32_s = _timed_probe(check, model, timed=kept is None)
    model.to(getattr(torch, target.dtype))
    reduced, reduced_s = _timed_probe(check, model, timed=kept is None)
    ok, detail = agree(reference, reduced)
    if not ok:
        return reload(), Precision("float32", f"{target.reason}; kept fp32: {detail}")
    if kept is None:
        kept = SpeedVerdict(fp32_s * 1000, reduced_s * 1000, time.time(), socket.gethostname())
        keep = kept.worth_keeping(device)
        if verdicts is not None and key and keep:
            verdicts.put(key, kept)
        when = "" if keep else " (too short to keep)"
    else:
        when = f" (timed {time.strftime('%Y-%m-%d', time.gmtime(kept.measured_at))}, kept)"
    speed = f"probe {kept.reduced_ms:.0f} ms vs fp32 {kept.fp32_ms:.0f} ms{when}"
    if kept.reduced_ms > kept.fp32_ms:
        # Native on paper, slower in practice (kernels, shapes, casts): not worth it.
        return reload(), Precision("float32", f"{target.reason}; kept fp32: {speed}")
    return model, Precision(target.dtype, f"{target.reason}; {detail}; {speed}")


def _timed_probe(
    probe: Callable[[Any], np.ndarray[Any, Any]], model: Any, timed: bool = True
) -> tuple[np.ndarray[Any, Any], float]:
    """The probe's output and its best time of two runs after a warm-up (the output
    comes back to the host, so GPU work is included); untimed: one run, no time."""
    output = probe(model)
    if not timed:
        return output, 0.0
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        output = probe(model)
        best = min(best, time.perf_counter() - started)
    return output, best


def parameter_count(model: Any) -> int:
    return int(sum(p.numel() for p in model.parameters()))

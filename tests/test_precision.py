"""The dtype policy: what auto picks, the probe gate, and real models in bf16."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch

from shared.inputs.models import DEFAULT_DENSE_MODEL
from workers.inference import dense, precision
from workers.inference.engine import Inference
from workers.inference.precision import (
    SpeedVerdict,
    SpeedVerdicts,
    apply_precision,
    choose,
    min_cosine,
    scores_agree,
    vectors_agree,
    verdict_key,
)


def test_explicit_choices_and_auto_follow_the_hardware(monkeypatch) -> None:
    assert choose("fp32", "cpu").dtype == "float32"
    assert choose("bf16", "cpu").dtype == "bfloat16"
    assert choose("fp16", "cuda").dtype == "float16"
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "fma"})
    emulated = choose("auto", "cpu")
    assert emulated.dtype == "float32" and "without AMX/AVX512-BF16" in emulated.reason
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "amx_bf16", "avx512_bf16"})
    native = choose("auto", "cpu")
    assert native.dtype == "bfloat16" and "amx_bf16, avx512_bf16" in native.reason
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        choose("int8", "cpu")


def test_agreement_measures() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert min_cosine(a, a) == pytest.approx(1.0)
    # 45 degrees: cos = 0.7071 < 0.99
    ok, detail = vectors_agree(a, np.array([[1.0, 1.0], [0.0, 1.0]]))
    assert not ok and "0.7071" in detail
    assert scores_agree(np.array([0.5, 0.9]), np.array([0.51, 0.89]))[0]
    assert not scores_agree(np.array([0.5]), np.array([0.6]))[0]


class Linear(torch.nn.Module):
    """A model whose bf16 output can be made to disagree with fp32, and whose probe
    takes longer in one dtype (as a device would)."""

    def __init__(
        self, breaks_in_bf16: bool, slow: torch.dtype = torch.float32, slow_s: float = 0.06
    ) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)
        self.breaks = breaks_in_bf16
        self.slow = slow
        self.slow_s = slow_s

    def probe(self, _: Any = None) -> np.ndarray[Any, Any]:
        if self.layer.weight.dtype == self.slow:
            time.sleep(self.slow_s)
        out = self.layer(torch.eye(4, dtype=self.layer.weight.dtype)).float().detach().numpy()
        if self.breaks and self.layer.weight.dtype == torch.bfloat16:
            out = -out
        return out


@pytest.mark.parametrize(
    ("breaks", "slow", "kept", "why"),
    [
        (False, torch.float32, "bfloat16", "probe cosine min"),
        (True, torch.float32, "float32", "kept fp32: probe cosine min"),
        (False, torch.bfloat16, "float32", "kept fp32: probe"),  # agrees, but slower
    ],
)
def test_auto_keeps_bf16_only_when_the_probe_agrees_and_is_faster(
    monkeypatch, breaks, slow, kept, why
) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    torch.manual_seed(0)
    model = Linear(breaks, slow)
    reloads: list[Linear] = []

    def reload() -> Linear:
        reloads.append(Linear(breaks, slow))
        return reloads[-1]

    chosen, result = apply_precision(
        model, "auto", "cpu", lambda m: m.probe(), vectors_agree, reload
    )
    assert result.dtype == kept and why in result.reason
    if kept == "float32":
        assert chosen is reloads[0] and chosen.layer.weight.dtype == torch.float32
    else:
        assert chosen is model and model.layer.weight.dtype == torch.bfloat16 and not reloads


def test_real_dense_model_in_bf16_exports_float32_vectors_close_to_fp32() -> None:
    texts = ["experimental investigation of the aerodynamics of a wing", "boundary layer"]
    inference = Inference()
    fp32 = dense.load_dense(inference, DEFAULT_DENSE_MODEL, "fp32", texts)
    bf16 = dense.load_dense(inference, DEFAULT_DENSE_MODEL, "bf16", texts)
    assert fp32.info.dtype == "float32" and bf16.info.dtype == "bfloat16"
    assert bf16.info.parameters == fp32.info.parameters > 20_000_000
    a = fp32.model.encode(texts)
    b = bf16.model.encode(texts)
    assert b.dtype == np.float32
    assert min_cosine(a, b) > 0.99


def test_the_speed_verdict_is_kept_per_host_so_auto_decides_the_same_every_time(
    monkeypatch, tmp_path
) -> None:
    """The first probe times the model; a later worker on the host reuses that verdict
    even when its own timing would say otherwise (a busy core), while the quality half
    is still probed."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    verdicts = SpeedVerdicts(tmp_path / "cache" / "speed-verdicts.json")
    key = verdict_key("m", "rev", "cpu", "auto")

    def decide(slow: torch.dtype, breaks: bool = False) -> str:
        model = Linear(breaks, slow)
        _, result = apply_precision(
            model, "auto", "cpu", lambda m: m.probe(), vectors_agree,
            lambda: Linear(breaks, slow), verdicts=verdicts, key=key,
        )  # fmt: skip
        return f"{result.dtype}: {result.reason}"

    first = decide(slow=torch.float32)  # bf16 is faster: kept
    assert first.startswith("bfloat16") and "kept)" not in first
    assert verdicts.get(key) is not None
    again = decide(slow=torch.bfloat16)  # now bf16 would time slower: the verdict holds
    assert again.startswith("bfloat16") and "kept)" in again
    assert decide(slow=torch.float32, breaks=True).startswith("float32")  # quality still rules
    (tmp_path / "cache" / "speed-verdicts.json").write_text("not json")
    assert verdicts.get(key) is None  # a broken file is measured over
    assert decide(slow=torch.bfloat16).startswith("float32: auto")


def test_a_cpu_probe_too_short_to_time_decides_its_own_load_but_is_not_kept(
    monkeypatch, tmp_path
) -> None:
    """A small job's first batch (a few short texts) times noise: its verdict decides
    that load only, and a short verdict already in the file is timed over, so one tiny
    job cannot pin a host's models to fp32 for good."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16"})
    verdicts = SpeedVerdicts(tmp_path / "speed-verdicts.json")
    key = verdict_key("m", "rev", "cpu", "auto")

    def decide(slow_s: float) -> str:
        _, result = apply_precision(
            Linear(False, torch.float32, slow_s), "auto", "cpu", lambda m: m.probe(),
            vectors_agree, lambda: Linear(False, torch.float32, slow_s),
            verdicts=verdicts, key=key,
        )  # fmt: skip
        return f"{result.dtype}: {result.reason}"

    short = decide(slow_s=0.01)  # fp32 slower by 10 ms: bf16, for this load
    assert short.startswith("bfloat16") and "too short to keep" in short
    assert verdicts.get(key) is None
    # A short verdict from an earlier run (as a test's tiny job once left) says fp32 ...
    verdicts.put(key, SpeedVerdict(fp32_ms=14.8, reduced_ms=15.5, measured_at=0.0))
    # ... and is timed over instead of obeyed; a long enough probe's verdict is kept.
    assert decide(slow_s=0.06).startswith("bfloat16")
    kept = verdicts.get(key)
    assert kept is not None and kept.fp32_ms >= precision.MIN_KEPT_CPU_PROBE_MS


def test_a_kept_verdict_leaves_only_the_quality_probe_on_a_few_items(monkeypatch, tmp_path) -> None:
    """With the host's speed verdict kept, a load checks quality only, and on the
    quality probe (the probe's longest few items), not the whole first batch twice; the
    first load, which times, runs the whole probe. A quality probe that disagrees still
    sends the model back to fp32."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"amx_bf16"})
    verdicts = SpeedVerdicts(tmp_path / "speed-verdicts.json")
    key = verdict_key("m", "rev", "cpu", "auto")
    calls: list[str] = []

    def decide(breaks: bool = False) -> str:
        model = Linear(breaks, torch.float32)

        def whole(m: Linear) -> np.ndarray[Any, Any]:
            calls.append("whole")
            return m.probe()

        def few(m: Linear) -> np.ndarray[Any, Any]:
            calls.append("few")
            return m.probe()

        _, result = apply_precision(
            model, "auto", "cpu", whole, vectors_agree, lambda: Linear(breaks),
            verdicts=verdicts, key=key, quality_probe=few,
        )  # fmt: skip
        return result.dtype

    assert decide() == "bfloat16" and set(calls) == {"whole"}  # timed: the whole probe
    calls.clear()
    assert decide() == "bfloat16" and calls == ["few", "few"]  # fp32, then bf16
    calls.clear()
    assert decide(breaks=True) == "float32" and calls == ["few", "few"]
    assert precision.QUALITY_PROBE_ITEMS <= 16

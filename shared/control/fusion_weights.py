"""Fusion weights from the command line: ``--alpha`` or ``--fusion-weights``.

Shared because the producer checks them before anything is enqueued and the
aggregator (``workers.ranking.fusion``) applies them.
"""

from __future__ import annotations

import math

from shared.records.errors import EmbedFleetError
from shared.records.schemas import DENSE_RANKING


def default_weights(sparse_models: list[str], alpha: float) -> dict[str, float]:
    """The fusion weights implied by ``--alpha``: dense gets ``alpha``, the sparse models
    share the rest equally.

    Why: one knob covers the common case (how much to trust dense over lexical
    matching) without making the user name every model; ``--fusion-weights`` is for the rest.

    Args:
        sparse_models: The job's sparse models, each a ranking under its own name.
        alpha: The dense weight, in ``[0, 1]``.

    Returns:
        ``{DENSE_RANKING: alpha, model: (1 - alpha) / len(sparse_models), ...}``, or
        ``{DENSE_RANKING: 1.0}`` when there are no sparse models (dense is then the only
        ranking, whatever ``alpha`` says).

    Raises:
        EmbedFleetError: ``alpha`` is outside ``[0, 1]``, or a sparse model is named twice
            or named like the dense ranking.
    """
    if not (0.0 <= alpha <= 1.0):
        raise EmbedFleetError(
            f"--alpha {alpha} is outside [0, 1]",
            "Pass the dense weight as a number from 0 (sparse only) to 1 (dense only)",
        )
    if not sparse_models:
        return {DENSE_RANKING: 1.0}
    _check_ranking_names(sparse_models)
    share = (1.0 - alpha) / len(sparse_models)
    return {DENSE_RANKING: alpha, **dict.fromkeys(sparse_models, share)}


def _check_ranking_names(sparse_models: list[str]) -> None:
    """Reject sparse model lists whose names would collide as ranking names."""
    if DENSE_RANKING in sparse_models:
        raise EmbedFleetError(
            f"a sparse model is named {DENSE_RANKING!r}, the name of the dense ranking",
            "Name the sparse model differently",
        )
    repeated = sorted({name for name in sparse_models if sparse_models.count(name) > 1})
    if repeated:
        raise EmbedFleetError(
            f"sparse model(s) {', '.join(repeated)} named more than once",
            "Name each sparse model once",
        )


def parse_weights(text: str, rankings: list[str]) -> dict[str, float]:
    """Parse ``--fusion-weights`` such as ``"dense=0.5,splade-tiny=0.25,bm25=0.25"``.

    Why strict: a misspelt or forgotten ranking would otherwise silently fuse with a
    weight of 0 (or not at all), which looks like a retrieval-quality problem rather
    than a typo. Weights are normalised to sum to 1 so ``1,1,2`` and ``0.25,0.25,0.5``
    mean the same, and scores stay comparable across jobs.

    Args:
        text: Comma-separated ``name=weight`` pairs; whitespace around parts is ignored.
        rankings: The job's rankings (``dense`` and each sparse model); every one must be
            named exactly once, and nothing else.

    Returns:
        Ranking name -> weight, in the order of ``rankings``, summing to 1.

    Raises:
        EmbedFleetError: An entry is malformed, names an unknown ranking or one already
            named, has a weight that is not a finite number >= 0, a ranking is left out,
            or every weight is 0.
    """
    expected = ", ".join(rankings)
    fix = (
        "Pass --fusion-weights as name=weight pairs separated by commas, one per "
        f"ranking: {expected}"
    )
    parsed: dict[str, float] = {}
    for raw_entry in text.split(","):
        entry = raw_entry.strip()
        if not entry:
            raise EmbedFleetError(f"--fusion-weights {text!r} has an empty entry", fix)
        name, sep, value = (part.strip() for part in entry.rpartition("="))
        if not sep or not name:
            raise EmbedFleetError(f"--fusion-weights entry {entry!r} is not name=weight", fix)
        if name not in rankings:
            raise EmbedFleetError(f"--fusion-weights names {name!r}, which is not a ranking", fix)
        if name in parsed:
            raise EmbedFleetError(f"--fusion-weights names {name!r} more than once", fix)
        try:
            weight = float(value)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight) or weight < 0:
            raise EmbedFleetError(
                f"--fusion-weights gives {name!r} the weight {value!r}",
                "Give every ranking a finite number >= 0 as its weight",
            )
        parsed[name] = weight
    left_out = [name for name in rankings if name not in parsed]
    if left_out:
        raise EmbedFleetError(f"--fusion-weights leaves out {', '.join(left_out)}", fix)
    total = sum(parsed.values())
    if total <= 0:
        raise EmbedFleetError(
            f"--fusion-weights {text!r} gives every ranking the weight 0",
            "Give at least one ranking a weight above 0",
        )
    return {name: parsed[name] / total for name in rankings}

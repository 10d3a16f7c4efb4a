"""Python's cyclic garbage collector kept off a worker's long-lived objects.

Why: a model worker holds about half a million objects that live as long as it does
(torch, transformers and sentence-transformers' modules, the models, the tokenizers).
Every full collection walks all of them, and a unit that allocates many objects (a
rerank message of 16 query groups decodes 12,800 candidates and lays out as many
pairs) sets off several: measured in a rerank worker of the null CrossEncoder
(``bench/feed.py``), a message of 13 groups spent 382 ms of its 1,015 ms in 79
collections. After the objects alive once a model is loaded are frozen (``gc.freeze``:
the collector no longer looks at them), the same message spent 5 ms.

When: after a unit in which the worker loaded a model (a hydration or an eviction
moves a model between devices and makes no new objects), first unfreezing and
collecting, so that whatever became garbage since the last freeze (a released model,
what loading left behind) is collected, not kept. That
full collection costs about 0.3 s beside a model load's seconds, once per load; a
collection would have walked the same objects soon anyway.
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> int:
    """Collect what is garbage now, then keep the collector off every object alive;
    returns how many objects are frozen."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

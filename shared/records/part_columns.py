"""A Parquet part's columns read back (the layout ``workers.aggregate.parts`` writes).

Used wherever a part is read again: an earlier job's vectors copied by ``run --reuse``
(``workers.prepare.reuse``) and the search-system exports (``producer.search_exports``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa


def dense_matrix(values: pa.FixedSizeListArray) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A ``dense_<model>`` column (``fixed_size_list<float32>[dim]``, one chunk per row)
    as a float32 matrix of one row per chunk."""
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(values), values.type.list_size)

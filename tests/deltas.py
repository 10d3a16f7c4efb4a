"""Applying ``export --to delta`` as a user's vector store would, in DuckDB, and
comparing the result with a job's own parts: every column, dense vectors bit for bit."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa


def applied(old: pa.Table, folder: Path) -> pa.Table:
    """``old``'s rows with the delta in ``folder`` applied (its deletes deleted, its
    upserts deleted then inserted), ordered by chunk id."""
    con = duckdb.connect()
    con.register("old_rows", old)
    con.execute("CREATE TABLE store AS SELECT * FROM old_rows")
    upserts = str(folder / "upserts" / "*.parquet")
    for listed in (str(folder / "deletes.parquet"), upserts):
        con.execute(
            "DELETE FROM store WHERE chunk_id IN (SELECT chunk_id FROM read_parquet(?))", [listed]
        )
    con.execute("INSERT INTO store SELECT * FROM read_parquet(?)", [upserts])
    return pa.table(con.sql("SELECT * FROM store ORDER BY chunk_id").arrow())


def assert_same_rows(got: pa.Table, want: pa.Table) -> None:
    """The same columns and rows, in order; dense vectors bit for bit."""
    assert got.column_names == want.column_names
    for name in want.column_names:
        if name.startswith("dense_"):
            bits = [
                np.asarray(t[name].combine_chunks().flatten(), np.float32).view(np.uint32)
                for t in (got, want)
            ]
            assert np.array_equal(*bits), name
        else:
            assert got[name].to_pylist() == want[name].to_pylist(), name

"""The ids of a job's things, defined once: chunks, staged batches, groups of work.

The producer builds these ids and the workers read them back, so their format lives
here and nowhere else. Ids are plain strings a person can read in a log or a key; the
only ones ever taken apart are a chunk id (the aggregator needs its document) and a
document batch id (the export needs the like-length window it was staged in).
"""

from __future__ import annotations

import zlib

CHUNK_SEPARATOR = "#"


def chunk_id(doc_id: str, index: int) -> str:
    """``{doc_id}#{index}``: the ``index``-th chunk of a document (0-based)."""
    return f"{doc_id}{CHUNK_SEPARATOR}{index}"


def doc_id_of(chunk: str) -> str:
    """The document of a chunk id; a document id may itself contain ``#``."""
    return chunk.rsplit(CHUNK_SEPARATOR, 1)[0]


def document_batch_id(number: int) -> str:
    """Staged document batches: ``b000000``, ``b000001``, ... (they sort in staging order)."""
    return f"b{number:06d}"


def range_batch_id(range_index: int, number: int) -> str:
    """Document batches a prepare unit stages from one read range: ``b00003-00012`` (the
    13th batch of range 3; they sort in reading order)."""
    return f"b{range_index:05d}-{number:05d}"


def like_length_window(batch_id: str, window: int) -> tuple[str, int]:
    """The like-length window a document batch was staged in
    (:func:`shared.inputs.chunking.chunk_batches`): the stream it came from (a read range,
    or the producer's one stream) and its number there over ``window``. Batches of one
    window are consecutive in staging order."""
    stream, _, number = batch_id.rpartition("-")
    if not stream:  # b000012: the producer's one stream
        stream, number = batch_id[:1], batch_id[1:]
    return stream, int(number) // max(1, window)


def range_id(index: int) -> str:
    """A read range of a collection: ``r00000``, ``r00001``, ..."""
    return f"r{index:05d}"


def range_index(unit: str) -> int:
    """The index of a read range (or id partition) from its unit id."""
    return int(unit[1:])


def partition_id(index: int) -> str:
    """An id partition of the duplicate check: ``p0000``, ..."""
    return f"p{index:04d}"


def id_partition(doc_id: str, partitions: int) -> int:
    """The partition a document id's duplicates are looked for in: a stable hash (the
    same in every process, unlike Python's ``hash``)."""
    return zlib.crc32(doc_id.encode()) % partitions


def query_batch_id(number: int) -> str:
    """Staged query batches: ``q000000``, ... (a query is its own one chunk)."""
    return f"q{number:06d}"


def is_query_batch(batch_id: str) -> bool:
    """Whether a staged batch id is a query batch's (else a document batch's)."""
    return batch_id.startswith("q")


def group_id(kind: str, number: int) -> str:
    """A group of work fanned out by an aggregator step: ``dense-g00000`` (retrieval over
    one group of shards), ``q-g00000`` (one group of queries), ``f-g00000`` (a run of
    query groups fused together). Unique within its stage."""
    return f"{kind}-g{number:05d}"

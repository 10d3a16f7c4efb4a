"""Queries and relevance judgements: found next to a BEIR collection or given as files.

Queries are read whole (a query set is small next to its collection) and checked
before anything is enqueued: a bad line stops the run with its file and line, since a
silently dropped query would skew every metric. Judgements (qrels) are read as BEIR's
``query-id <TAB> corpus-id <TAB> score`` with a header, or TREC's four columns.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from shared.inputs.compressed import COMPRESSED_SUFFIXES
from shared.inputs.locations import SourcePath, locate
from shared.inputs.sources import Source, documents, open_jsonl
from shared.records.errors import EmbedFleetError
from shared.records.schemas import Document, SkippedRecord


@dataclass(frozen=True)
class Query:
    id: str
    text: str


@dataclass(frozen=True)
class QuerySet:
    """The queries of a job and where they came from.

    Attributes:
        queries: In file order (``results.jsonl`` keeps it).
        path: The queries file.
        qrels: Judgements (query id -> doc id -> grade), or None.
        qrels_path: Their file, or None.
    """

    queries: list[Query]
    path: SourcePath
    qrels: dict[str, dict[str, int]] | None = None
    qrels_path: SourcePath | None = None


def find_query_files(
    source: Source,
    queries: str | None,
    qrels: str | None,
    no_queries: bool,
    transient_window_s: float = 0.0,
) -> tuple[SourcePath | None, SourcePath | None]:
    """The queries and qrels files of a job: given explicitly (a path or an ``s3://``
    object), else a BEIR folder's ``queries.jsonl`` (or ``.gz``, ``.zst``) and
    ``qrels/test.tsv``, on disk or in S3 beside the corpus; none with ``--no-queries``."""
    if no_queries:
        if queries or qrels:
            raise EmbedFleetError(
                "--no-queries contradicts --queries/--qrels", "Pass one or the other"
            )
        return None, None
    beir = source.kind == "beir" and source.path.is_dir()
    queries_path = locate(queries, transient_window_s) if queries else None
    if queries_path is None and beir:
        found = [source.path / f"queries.jsonl{c}" for c in ("", *COMPRESSED_SUFFIXES)]
        queries_path = next((path for path in found if path.is_file()), None)
    qrels_path = locate(qrels, transient_window_s) if qrels else None
    if qrels_path is None and beir and queries is None:
        default = source.path / "qrels" / "test.tsv"
        qrels_path = default if default.is_file() else None
    if qrels_path is not None and queries_path is None:
        raise EmbedFleetError(
            f"--qrels {qrels_path} given without queries", "Pass --queries FILE as well"
        )
    for path, flag in ((queries_path, "--queries"), (qrels_path, "--qrels")):
        if path is not None and not path.is_file():
            raise EmbedFleetError(f"{flag} file {str(path)!r} does not exist", f"Fix {flag}")
    return queries_path, qrels_path


def read_queries(path: SourcePath) -> list[Query]:
    """Every query of a JSONL file (``{"id"|"_id", "text"}``), checked.

    Raises:
        EmbedFleetError: naming the file and line of the first bad query.
    """
    out: list[Query] = []
    source = open_jsonl(path)
    for record in documents(source, "skip"):
        if isinstance(record, SkippedRecord):
            raise _bad_query(record.path, record.line, record.reason)
        assert isinstance(record, Document)
        text = record.text.strip()
        if not text:
            raise _bad_query(record.path, record.line, f"query {record.id!r} has no text")
        out.append(Query(record.id, text))
    if not out:
        raise EmbedFleetError(f"{path} holds no queries", "Pass a JSONL file of {id, text}")
    return out


def _bad_query(path: str, line: int, reason: str) -> EmbedFleetError:
    return EmbedFleetError(
        f"{path}:{line}: {reason}",
        'Fix the query (one JSON object {"id", "text"} per line), or pass --no-queries',
    )


def read_qrels(path: SourcePath, query_ids: set[str]) -> dict[str, dict[str, int]]:
    """Judgements from a BEIR TSV (``query-id corpus-id score``, header optional) or a
    TREC qrels file (``query-id iteration corpus-id grade``).

    Raises:
        EmbedFleetError: naming the file and line of a malformed row, or when no
            judged query is among the job's queries.
    """
    judgements: dict[str, dict[str, int]] = {}
    with io.TextIOWrapper(path.open("rb"), encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if number == 1 and fields[0] in ("query-id", "query_id", "qid"):
                continue  # BEIR header
            if len(fields) == 3:
                qid, doc, grade = fields
            elif len(fields) == 4:
                qid, _, doc, grade = fields
            else:
                raise _bad_qrels(path, number, f"{len(fields)} columns, expected 3 or 4")
            try:
                judgements.setdefault(qid, {})[doc] = int(float(grade))
            except ValueError:
                raise _bad_qrels(path, number, f"grade {grade!r} is not a number") from None
    if not judgements.keys() & query_ids:
        raise EmbedFleetError(
            f"{path}: none of its {len(judgements)} judged queries is among the queries",
            "Pass the qrels that belong to these queries (ids must match)",
        )
    return judgements


def _bad_qrels(path: SourcePath, line: int, reason: str) -> EmbedFleetError:
    return EmbedFleetError(
        f"{path}:{line}: {reason}",
        "Use BEIR's `query-id<TAB>corpus-id<TAB>score` or TREC's `qid 0 docid grade`",
    )


def load_query_set(queries_path: SourcePath, qrels_path: SourcePath | None) -> QuerySet:
    queries = read_queries(queries_path)
    qrels = read_qrels(qrels_path, {q.id for q in queries}) if qrels_path else None
    return QuerySet(queries, queries_path, qrels, qrels_path)

"""What a model runs on for one unit: each item's ids, batch by batch, made ready for it.

A model gets its ids the first of three ways that applies:

- **staged**: the ids the chunk stage kept with the chunks (:mod:`shared.inputs.tokens`), when
  the model's tokenizer has the identity that made them, laid out by the model's
  :class:`~workers.inference.layout.InputLayout`. Nothing tokenizes the text again.
- **tokenized**: the model's own Rust tokenizer, over every text of the unit in one
  call ahead of the model (another tokenizer than the chunk stage's; a query or a
  passage the unit has no staged ids for), laid out the same way.
- **preprocess**: the model's own ``preprocess``, batch by batch, as ``encode`` and
  ``predict`` call it: for a model that adds a prompt, or whose inputs no layout
  reproduces.

Every way gives the model exactly the tensors its own ``encode`` / ``predict`` would
(a layout is only used once it reproduced them at load, see ``learn_layout``). A
unit's ids are laid out once, special tokens included, from its distinct texts (a
rerank unit's queries and passages, each in many pairs); the feed then builds the
tensors of the next batches the runner announces, a window at a time (in pinned memory
on a GPU, copied ``non_blocking``), so on a GPU the next batches are laid out while the
current one still runs: nothing in the loop waits for the device until the unit's
outputs are read back, once.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from shared.inputs import tokens
from shared.inputs.tokens import tokenizer_identity
from shared.records.schemas import BatchKind, ChunkBatch
from workers.inference.batch_runner import model_dtype, pad_multiple
from workers.inference.engine import Inference
from workers.inference.layout import (
    Arranged,
    Ids,
    InputLayout,
    Pieces,
    learn_layout,
    rust_tokenizer,
    text_ids,
)

Source = Literal["staged", "tokenized", "preprocess"]
T = TypeVar("T")


@dataclass(frozen=True)
class ModelInputs:
    """How one model takes its inputs, worked out once per process and model.

    Attributes:
        identity: Its tokenizer's identity (:func:`shared.inputs.tokens.tokenizer_identity`).
        layout: How ids become its tensors (``None``: only its ``preprocess`` can say).
        prompt: The prompt its encode call prepends (``None`` if none).
        kwargs: What its encode call passes on to ``preprocess`` and the forward pass
            (``task="query"`` for queries).
        rust: Its Rust tokenizer, without truncation or padding.
    """

    identity: str
    layout: InputLayout | None
    prompt: str | None
    kwargs: dict[str, Any]
    rust: Any

    def preprocess(self, model: Any, items: list[Any]) -> dict[str, Any]:
        """The model's own input step, as its encode call makes it."""
        return dict(model.preprocess(items, prompt=self.prompt, **self.kwargs))


def model_inputs(
    inference: Inference,
    key: tuple[str, ...],
    model: Any,
    *,
    prompt_name: str | None = None,
    task: str | None = None,
    pairs: bool = False,
) -> ModelInputs:
    """The :class:`ModelInputs` of a model (built once per process and ``key``).

    Args:
        inference: The process's models (where it is kept).
        key: What it is kept under (the model's kind, name and the kind of input).
        model: A ``SentenceTransformer``, ``SparseEncoder`` or ``CrossEncoder``.
        prompt_name: The prompt the encode call asks for (``query`` for queries, where
            the model has one); the model's default prompt otherwise.
        task: The task its encode call passes (``query`` for queries).
        pairs: Whether it takes (query, passage) pairs.
    """

    def build() -> ModelInputs:
        prompt = _prompt(model, prompt_name)
        kwargs = {"task": task} if task else {}

        def preprocess(items: list[Any]) -> dict[str, Any]:
            return dict(model.preprocess(items, prompt=prompt, **kwargs))

        layout = None if prompt else learn_layout(model.tokenizer, preprocess, pairs)
        backend = model.tokenizer.backend_tokenizer
        return ModelInputs(
            tokenizer_identity(backend), layout, prompt, kwargs, rust_tokenizer(model.tokenizer)
        )

    found: ModelInputs = inference.once(("inputs", *key), build)
    return found


def encode_inputs(
    inference: Inference, family: str, name: str, model: Any, kind: BatchKind
) -> ModelInputs:
    """How an encoder (dense or sparse) takes documents (``encode``) or queries
    (``encode_query``: the model's query prompt, if it has one, and ``task="query"``)."""
    queries = kind == "queries"
    return model_inputs(
        inference,
        (family, name, kind),
        model,
        prompt_name="query" if queries else None,
        task="query" if queries else None,
    )


def _prompt(model: Any, prompt_name: str | None) -> str | None:
    """The prompt sentence-transformers' encode would prepend (the named one, else the
    model's default); ``None`` for none."""
    prompts: dict[str, str] = getattr(model, "prompts", None) or {}
    if prompt_name is not None and prompt_name in prompts:
        return prompts[prompt_name] or None
    default = getattr(model, "default_prompt_name", None)
    return (prompts.get(default) or None) if default else None


@dataclass
class Feed:
    """One model's inputs for one unit (see module doc).

    Attributes:
        inputs: How the model takes its inputs.
        lengths: Each item's length in ids, special tokens included (what batches are
            cut by).
        source: Where its ids came from (``staged``, ``tokenized``, or ``preprocess``).
        texts: Each item as ``preprocess`` takes it (the ``preprocess`` way).
        tokenized: How many texts the worker tokenized itself.
        arranged: Every item's ids laid out, truncated as the model truncates (the
            layout's ways; ``None`` for ``preprocess``).
    """

    inputs: ModelInputs
    lengths: list[int]
    source: Source
    texts: Sequence[Any] = ()
    tokenized: int = 0
    arranged: Arranged | None = None
    _asked: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)
    _ready: dict[tuple[tuple[int, ...], str], dict[str, Any]] = field(
        default_factory=dict, repr=False
    )

    def lay_out(self, model: Any, groups: list[list[int]]) -> None:
        """Lay the tensors of the next batches ``model`` will run out together, ahead
        of their forward passes (what :meth:`features` then hands out; the
        runner's ``lay_out``, see :data:`~workers.inference.batch_runner.LAY_OUT_AHEAD`).
        What an earlier window laid out and no batch took is dropped."""
        self._ready.clear()
        if self.arranged is None:
            return
        device = self.device(model)
        cuda, multiple = _is_cuda(device), self._multiple(model, device)
        for group in groups:
            self._ready[tuple(group), device] = self.arranged.tensors(group, cuda, multiple)

    def features(self, model: Any, group: list[int], device: str) -> dict[str, Any]:
        """The model's input tensors for the items of ``group``, on ``device``."""
        batch: dict[str, Any] | None
        if self.arranged is None:
            batch = self.inputs.preprocess(model, [self.texts[i] for i in group])
        else:
            cuda = _is_cuda(device)
            batch = self._ready.pop((tuple(group), device), None)
            if batch is None:  # not laid out ahead (a re-cut, a split half, the CPU copy)
                batch = self.arranged.tensors(group, cuda, self._multiple(model, device))
            if not cuda and device == "cpu":  # laid out where the model is: nothing to copy
                return batch
        return {
            key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
        }

    def _multiple(self, model: Any, device: str) -> int:
        """The width multiple of ``model``'s batches (the batching rule's
        :func:`~workers.inference.batch_runner.pad_multiple`)."""
        key = ("multiple", id(model), device)
        return int(self._once(key, lambda: pad_multiple(device, model_dtype(model))))

    def device(self, model: Any) -> str:
        """Where ``model``'s parameters are (:func:`device_of`)."""
        return str(self._once(("device", id(model)), lambda: device_of(model)))

    def _once(self, key: tuple[Any, ...], ask: Callable[[], Any]) -> Any:
        """What ``ask`` answers, asked once per unit: a model's dtype or device walks
        its modules, which costs as much as laying a small batch out."""
        if key not in self._asked:
            self._asked[key] = ask()
        return self._asked[key]


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


@dataclass(frozen=True)
class Distinct:
    """A unit's texts with each repeat left out: what its models encode.

    Corpora repeat passages (boilerplate, templated text, mirrored pages), and the same
    text gives the same vector, so a unit's encoders run on each distinct text once and
    every row that has it gets that output, copied bit for bit.

    Attributes:
        firsts: Each distinct text's first position in the unit.
        rows: Each position's distinct text (an index into ``firsts``), or -1 for a
            position left out (its vector is already known: an earlier job's).
    """

    firsts: list[int]
    rows: list[int]

    @classmethod
    def of(cls, texts: Sequence[str], known: Collection[int] = ()) -> Distinct:
        """The distinct texts of ``texts``, leaving out the positions in ``known``."""
        index: dict[str, int] = {}
        firsts: list[int] = []
        rows: list[int] = []
        for position, text in enumerate(texts):
            if position in known:
                rows.append(-1)
                continue
            found = index.setdefault(text, len(firsts))
            if found == len(firsts):
                firsts.append(position)
            rows.append(found)
        return cls(firsts, rows)

    def pick(self, items: Sequence[T]) -> list[T]:
        """The items of the distinct texts, in first-seen order."""
        return [items[i] for i in self.firsts]

    def members(self) -> list[list[int]]:
        """Each distinct text's positions."""
        out: list[list[int]] = [[] for _ in self.firsts]
        for position, row in enumerate(self.rows):
            if row >= 0:
                out[row].append(position)
        return out


def served_positions(batches: Sequence[ChunkBatch]) -> set[int]:
    """The positions, in the unit's chunk order, of the chunks another chunk of the
    job serves (``ChunkBatch.served``): left out of every model's encoding."""
    out: set[int] = set()
    offset = 0
    for batch in batches:
        out.update(offset + served.row for served in batch.served)
        offset += len(batch.chunks)
    return out


@dataclass(frozen=True)
class StagedIds:
    """The staged ids of a unit's items, where they have them: each staged batch's ids
    stay the one array they were decoded as (:func:`shared.inputs.tokens.flat`), and an
    item is an index into them, so nothing makes an array per item.

    Attributes:
        pieces: The ids, a piece per staged item.
        of: Each item's piece, or -1 for an item without staged ids of the model's
            identity (the worker tokenizes it).
    """

    pieces: Pieces
    of: Ids

    @classmethod
    def none(cls, items: int) -> StagedIds:
        """``items`` items, none with staged ids."""
        empty = np.zeros(0, dtype=np.int64)
        return cls(Pieces(empty, empty, empty), np.full(items, -1, dtype=np.int64))

    @classmethod
    def of_arrays(cls, arrays: Sequence[Ids | None]) -> StagedIds:
        """Each item's ids as an array of its own, or ``None``."""
        found = [ids for ids in arrays if ids is not None]
        of = np.full(len(arrays), -1, dtype=np.int64)
        of[[i for i, ids in enumerate(arrays) if ids is not None]] = np.arange(len(found))
        return cls(Pieces.of(found), of)

    def pick(self, positions: Sequence[int]) -> StagedIds:
        """The staged ids of the items at ``positions``, in that order."""
        return StagedIds(self.pieces, self.of[np.asarray(positions, dtype=np.int64)])


def staged_ids(batches: Sequence[ChunkBatch], identity: str) -> StagedIds:
    """Each chunk's staged ids, where its batch's ids were made by a tokenizer of this
    identity (else none: the worker tokenizes that chunk itself).

    Raises:
        ValueError: if a batch holds ids for another number of chunks than it has (a
            corrupt batch).
    """
    ids: list[Ids] = []
    lengths: list[Ids] = []
    of: list[Ids] = []
    count = 0
    for batch in batches:
        staged, chunks = batch.tokens, len(batch.chunks)
        if staged is None or staged.tokenizer != identity:
            of.append(np.full(chunks, -1, dtype=np.int64))
            continue
        flat, each = tokens.flat(staged)
        if len(each) != chunks:
            raise ValueError(
                f"staged batch {batch.batch_id} holds ids for {len(each)} chunks but has "
                f"{chunks} chunks"
            )
        ids.append(flat)
        lengths.append(each)
        of.append(np.arange(count, count + chunks, dtype=np.int64))
        count += chunks
    if not ids:
        return StagedIds.none(sum(len(b.chunks) for b in batches))
    pieces = Pieces.of_flat(np.concatenate(ids), np.concatenate(lengths))
    return StagedIds(pieces, np.concatenate(of))


def text_feed(
    inputs: ModelInputs,
    texts: Sequence[str],
    staged: StagedIds,
    approximate: Callable[[int], int],
) -> Feed:
    """The feed of single texts (chunks, queries).

    Args:
        inputs: The model's way with inputs.
        texts: Every item's text.
        staged: Every item's staged ids, where it has them (see :func:`staged_ids`).
        approximate: An item's length when only ``preprocess`` can lay it out (its
            chunk's token count plus the special tokens).
    """
    layout = inputs.layout
    if layout is None:
        return Feed(inputs, [approximate(i) for i in range(len(texts))], "preprocess", texts=texts)
    pieces, of, missing = _tokenized(inputs, texts, staged)
    arranged = layout.arrange_pieces([(pieces, of)])
    source: Source = "staged" if not missing else "tokenized"
    return Feed(inputs, arranged.lengths.tolist(), source, texts, missing, arranged)


def pair_feed(
    inputs: ModelInputs,
    pairs: Sequence[tuple[str, str]],
    staged: StagedIds,
    approximate: Callable[[int], int],
) -> Feed:
    """The feed of (query, passage) pairs: each distinct query tokenized once, each
    passage from its staged ids where it has them (``staged``, a pair's passage's),
    else tokenized with the rest of the unit's in one call."""
    layout = inputs.layout
    if layout is None or layout.pair is None:
        return Feed(inputs, [approximate(i) for i in range(len(pairs))], "preprocess", texts=pairs)
    # Each distinct query and passage once: a query is in every pair of its candidates,
    # a passage in the pairs of every query that retrieved it.
    queries: dict[str, int] = {}
    passages: dict[str, int] = {}
    first_pair: list[int] = []  # each distinct passage's first pair
    query_of: list[int] = []
    passage_of: list[int] = []
    for position, (query, passage) in enumerate(pairs):
        query_of.append(queries.setdefault(query, len(queries)))
        number = passages.setdefault(passage, len(passages))
        if number == len(first_pair):
            first_pair.append(position)
        passage_of.append(number)
    pieces, of, missing = _tokenized(inputs, list(passages), staged.pick(first_pair))
    arranged = layout.arrange_pieces(
        [
            (Pieces.of(text_ids(inputs.rust, list(queries))), np.asarray(query_of, dtype=np.int64)),
            (pieces, of[np.asarray(passage_of, dtype=np.int64)]),
        ]
    )
    source: Source = "staged" if not missing else "tokenized"
    return Feed(inputs, arranged.lengths.tolist(), source, pairs, missing, arranged)


def _tokenized(
    inputs: ModelInputs, texts: Sequence[str], staged: StagedIds
) -> tuple[Pieces, Ids, int]:
    """Every text's ids as pieces and each text's piece: its staged ids, else the
    model's Rust tokenizer's (the texts without staged ids in one call, their pieces
    after the staged ones); and how many were tokenized."""
    missing = np.flatnonzero(staged.of < 0)
    if not len(missing):
        return staged.pieces, staged.of, 0
    made = Pieces.of(text_ids(inputs.rust, [texts[i] for i in missing.tolist()]))
    of = staged.of.copy()
    of[missing] = len(staged.pieces.lengths) + np.arange(len(missing), dtype=np.int64)
    return staged.pieces.joined(made), of, len(missing)


def forward(model: Any, feed: Feed, group: list[int]) -> dict[str, Any]:
    """The model's forward pass over one batch of the feed, on the device the model is
    on, as its own encode call runs it; outputs stay on the device."""
    features = feed.features(model, group, feed.device(model))
    with torch.inference_mode():
        out: dict[str, Any] = model(features, **feed.inputs.kwargs)
    return out


def per_device(
    outputs: Sequence[tuple[list[int], torch.Tensor]],
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Batches' outputs (each batch's item positions and its rows) gathered per device
    they were computed on: the positions in order and their rows concatenated there,
    still on the device, so that each device's results come back in one copy."""
    by_device: dict[str, list[tuple[list[int], torch.Tensor]]] = {}
    for group, values in outputs:
        by_device.setdefault(str(values.device), []).append((group, values))
    for parts in by_device.values():
        yield [i for group, _ in parts for i in group], torch.cat([v for _, v in parts])


def device_of(model: Any) -> str:
    """Where a model's parameters are (asked of the first one: sentence-transformers'
    ``device`` walks the module tree, which costs noticeably per model batch)."""
    for parameter in model.parameters():
        return str(parameter.device)
    return str(model.device)


def as_array(values: np.ndarray[Any, Any] | torch.Tensor) -> np.ndarray[Any, Any]:
    """A host array of a tensor (one device-to-host copy) or an array."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return values

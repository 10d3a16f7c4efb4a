"""How token ids become one model's input tensors, without its tokenizer in the loop.

A staged chunk carries its text's ids without special tokens (:mod:`shared.inputs.tokens`).
What the model needs on top is what its tokenizer would add: the special tokens around
one text or a (query, passage) pair, the type id of each part, truncation at the
model's limit, and padding to the batch's longest item. An :class:`InputLayout` holds
exactly that, learned from the model's own Rust tokenizer (which ids it puts where
around two probe texts), and is trusted only once it reproduces, tensor for tensor, what
the model's own ``preprocess`` gives for a set of probes: short and long texts, one past
the model's limit, pairs whose either side is the longer. A model for which it does not
(an unusual post-processor, a chat template, a processor that flattens batches) gets no
layout, and its worker tokenizes through ``preprocess`` as ``encode`` would.

Truncation follows the Rust tokenizer's rules: one text keeps its first ``limit``
tokens (its last, for a tokenizer that truncates on the left); a pair is cut
``longest_first`` exactly as ``tokenizers`` does it (the shorter side kept whole if it
fits in half, both sides halved otherwise).

Laying a batch out is a handful of numpy operations on the whole batch, not a Python
loop per token, and on a GPU its tensors are written straight into pinned host memory,
so their copy to the device can be ``non_blocking``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.records.logs import get_logger
from workers.inference.batch_runner import padded_width

log = get_logger("layout")

Ids = np.ndarray[Any, np.dtype[np.int64]]
Item = tuple[Ids, ...]
"""One input's text ids: one array (a text), or two (a pair)."""

_TEXT_A, _TEXT_B = "hello world", "good morning"
_TENSOR_KEYS = ("input_ids", "attention_mask", "token_type_ids")
# A probe longer than any model's limit (about 12,000 ids; a tokenizer's limit is capped
# at its position embeddings): its preprocessed length is the limit the model truncates to.
_LONG_WORDS = 8000


@dataclass(frozen=True)
class Part:
    """One part of a template: constant ids (special tokens) or one text's slot.

    Attributes:
        tokens: The constant ids (empty for a slot).
        types: The type id of each constant id (all one: special tokens between two
            texts are split where their type id steps, see ``_constant_parts``).
        slot: Which text fills this part (0 or 1), or ``None`` for constant ids.
        slot_type: The type id of the slot's ids.
    """

    tokens: tuple[int, ...] = ()
    types: tuple[int, ...] = ()
    slot: int | None = None
    slot_type: int = 0


@dataclass(frozen=True)
class Template:
    """The parts of one input in order: ``[CLS] A [SEP]`` or ``[CLS] A [SEP] B [SEP]``."""

    parts: tuple[Part, ...]

    @property
    def specials(self) -> int:
        """How many ids the template adds to its texts."""
        return sum(len(part.tokens) for part in self.parts)


def _template(full: Any, texts: Sequence[Sequence[int]]) -> Template | None:
    """The template that turns ``texts`` (ids without special tokens) into ``full`` (an
    encoding with them), or ``None`` if the texts are not found in it in order."""
    ids, types = list(full.ids), list(full.type_ids)
    parts: list[Part] = []
    at = 0
    for slot, text in enumerate(texts):
        n = len(text)
        found = next((i for i in range(at, len(ids) - n + 1) if ids[i : i + n] == list(text)), None)
        if not n or found is None or len(set(types[found : found + n])) != 1:
            return None
        parts += _constant_parts(ids[at:found], types[at:found])
        parts.append(Part(slot=slot, slot_type=types[found]))
        at = found + n
    parts += _constant_parts(ids[at:], types[at:])
    return Template(tuple(parts))


def _constant_parts(ids: list[int], types: list[int]) -> list[Part]:
    """Special tokens between texts as parts of one type id each (a layout's type ids
    step only where a part starts, see :attr:`Arranged.type_changes`)."""
    parts: list[Part] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or types[end] != types[start]:
            parts.append(Part(tokens=tuple(ids[start:end]), types=tuple(types[start:end])))
            start = end
    return parts


def _longest_first_many(first: Ids, second: Ids, limit: int) -> tuple[Ids, Ids]:
    """How many ids each side of each pair keeps, as ``tokenizers`` truncates a pair
    ``longest_first`` to ``limit`` ids (its special tokens already taken off): the
    shorter side whole if it fits in half, the longer cut to the rest; both halved
    otherwise (the longer side gets the odd id). On arrays: a unit's pairs at once."""
    short = np.minimum(first, second)
    long_keep = np.where(short > limit, short, np.maximum(short, limit - short))
    over = short + long_keep > limit
    short_keep = np.where(over, limit // 2, short)
    long_keep = np.where(over, limit // 2 + limit % 2, long_keep)
    swap = first > second
    fits = first + second <= limit
    keep1 = np.where(fits, first, np.where(swap, long_keep, short_keep))
    keep2 = np.where(fits, second, np.where(swap, short_keep, long_keep))
    return keep1, keep2


@dataclass(frozen=True)
class InputLayout:
    """How one model lays ids out (see module doc); built by :func:`learn_layout`.

    Attributes:
        single: The template of one text.
        pair: The template of a pair (``None`` if the tokenizer has none).
        max_length: The most ids an input may have, special tokens included (``None``:
            the model does not truncate).
        pad_id: The id padding positions get.
        pad_type_id: The type id padding positions get.
        left_padding: Pad on the left (decoder models) rather than the right.
        truncate_left: Truncation keeps a text's last ids rather than its first.
        keys: The tensors the model's ``preprocess`` gives, in its order.
        extras: The non-tensor entries it gives (``modality``), copied into every batch.
    """

    single: Template
    pair: Template | None
    max_length: int | None
    pad_id: int
    pad_type_id: int
    left_padding: bool
    truncate_left: bool
    keys: tuple[str, ...]
    extras: tuple[tuple[str, Any], ...] = ()

    def fit(self, item: Item) -> Item:
        """The item truncated as the model's tokenizer truncates it."""
        kept = self._kept([np.asarray([len(ids)], dtype=np.int64) for ids in item])
        return tuple(self._cut(ids, int(n[0])) for ids, n in zip(item, kept, strict=True))

    def _kept(self, lengths: Sequence[Ids]) -> list[Ids]:
        """How many ids each text of each item keeps (one array per text of an item, a
        unit's items at once), as the tokenizer truncates: one text to the limit, a pair
        ``longest_first``."""
        template = self._template_of(len(lengths))
        if self.max_length is None:
            return list(lengths)
        limit = max(0, self.max_length - template.specials)
        if len(lengths) == 1:
            return [np.minimum(lengths[0], limit)]
        return list(_longest_first_many(lengths[0], lengths[1], limit))

    def _template_of(self, texts: int) -> Template:
        template = self.single if texts == 1 else self.pair
        assert template is not None, "a pair needs a layout with a pair template"
        return template

    def _cut(self, ids: Ids, n: int) -> Ids:
        if n == len(ids):
            return ids
        return ids[len(ids) - n :] if self.truncate_left else ids[:n]

    def arrange(self, items: Sequence[Item]) -> Arranged:
        """Every already :meth:`fit` item laid out (see :meth:`arrange_pieces`), each
        of its texts a piece of its own."""
        texts = len(items[0]) if items else 1
        every = np.arange(len(items), dtype=np.int64)
        return self.arrange_pieces(
            [(Pieces.of([item[slot] for item in items]), every) for slot in range(texts)]
        )

    def arrange_pieces(self, slots: Sequence[tuple[Pieces, Ids]]) -> Arranged:
        """A unit's items truncated as the tokenizer truncates them and laid out once,
        special tokens included, end to end in one array: each batch is then one
        gather from it (:meth:`Arranged.tensors`).

        An item's texts are given as indices into pieces, one (pieces, indices) per text
        of the template (one: a text; two: a query and a passage): a rerank unit's
        10,000 pairs are 200 queries and a few thousand passages, so nothing here walks
        the pairs one by one. The whole layout is a few operations on arrays: the
        constant ids and every piece in one source array, and each position of the
        result one index into it.
        """
        template = self._template_of(len(slots))
        full = [pieces.lengths[index] for pieces, index in slots]
        kept = self._kept(full)
        count = len(slots[0][1]) if slots else 0
        parts = template.parts
        constants = [np.asarray(part.tokens, dtype=np.int64) for part in parts if part.slot is None]
        # Where each constant part and each text's pieces start in the source array.
        bases = np.cumsum([0, *map(len, constants), *(len(p.ids) for p, _ in slots)])
        source = np.concatenate([*constants, *(pieces.ids for pieces, _ in slots)])
        spans = np.empty((count, len(parts)), dtype=np.int64)
        starts = np.empty((count, len(parts)), dtype=np.int64)
        constant = 0
        for k, part in enumerate(parts):
            if part.slot is None:
                spans[:, k] = len(part.tokens)
                starts[:, k] = bases[constant]
                constant += 1
                continue
            pieces, index = slots[part.slot]
            first = pieces.starts[index] + bases[len(constants) + part.slot]
            if self.truncate_left:
                first += full[part.slot] - kept[part.slot]
            spans[:, k] = kept[part.slot]
            starts[:, k] = first
        flat_spans = spans.ravel()
        # Each (item, part)'s start in the result; each position's index into the
        # source: its span's start there, plus its place in the span.
        placed = np.cumsum(flat_spans) - flat_spans
        total = int(flat_spans.sum())
        at = np.repeat(starts.ravel() - placed, flat_spans)
        at += np.arange(total, dtype=np.int64)
        lengths = spans.sum(axis=1)
        # Type ids change only where a part of another type starts (BERT's pair: where
        # the passage starts): each item's start of each such part, and the step.
        types = [part.slot_type if part.slot is not None else part.types[0] for part in parts]
        within = np.cumsum(spans, axis=1) - spans
        changes = tuple(
            (within[:, k].copy(), types[k] - types[k - 1])
            for k in range(1, len(parts))
            if types[k] != types[k - 1]
        )
        offsets = np.cumsum(lengths) - lengths
        return Arranged(self, source.take(at), offsets, lengths, types[0], changes)

    def tensors(self, items: Sequence[Item], pinned: bool = False) -> dict[str, Any]:
        """One padded batch of already :meth:`fit` items, as the model's ``preprocess``
        would give it (``pinned``: in page-locked host memory, for a ``non_blocking``
        copy to a GPU)."""
        return self.arrange(items).tensors(list(range(len(items))), pinned)


@dataclass(frozen=True)
class Pieces:
    """Id sequences in one array: the distinct texts a unit's items point into.

    Attributes:
        ids: Every sequence's ids (one after another, though a sequence may be left
            unused: a staged chunk whose text repeats another's).
        starts: Where each sequence starts in ``ids``.
        lengths: Each sequence's length.
    """

    ids: Ids
    starts: Ids
    lengths: Ids

    @classmethod
    def of(cls, sequences: Sequence[Ids]) -> Pieces:
        lengths = np.fromiter(map(len, sequences), np.int64, len(sequences))
        ids = np.concatenate(sequences) if len(sequences) else np.zeros(0, dtype=np.int64)
        return cls.of_flat(ids, lengths)

    @classmethod
    def of_flat(cls, ids: Ids, lengths: Ids) -> Pieces:
        """Sequences already end to end in ``ids``, ``lengths`` long each."""
        return cls(ids.astype(np.int64, copy=False), np.cumsum(lengths) - lengths, lengths)

    def joined(self, other: Pieces) -> Pieces:
        """These pieces, then ``other``'s (piece ``len(self.lengths) + k`` is its k-th)."""
        return Pieces(
            np.concatenate([self.ids, other.ids]),
            np.concatenate([self.starts, other.starts + len(self.ids)]),
            np.concatenate([self.lengths, other.lengths]),
        )


@dataclass(frozen=True)
class Arranged:
    """A unit's items laid out end to end (see :meth:`InputLayout.arrange_pieces`).

    Attributes:
        layout: The model's layout.
        ids: Every item's ids with its special tokens, one item after another.
        offsets: Where each item starts in ``ids``.
        lengths: Each item's length.
        first_type: The type id of each item's first id.
        type_changes: Where the type id steps, and by how much: per step, each item's
            position of it (a pair's passage start) and the step.
    """

    layout: InputLayout
    ids: Ids
    offsets: Ids
    lengths: Ids
    first_type: int = 0
    type_changes: tuple[tuple[Ids, int], ...] = ()

    def tensors(
        self, group: Sequence[int], pinned: bool = False, multiple: int = 1
    ) -> dict[str, Any]:
        """The padded batch of the items of ``group``, as the model's ``preprocess``
        would give it: each row gathered from the flat arrays at once (``pinned``: in
        page-locked host memory, for a ``non_blocking`` copy to a GPU).

        ``multiple``: the width is the longest item rounded up to it (the batching
        rule's :func:`~workers.inference.batch_runner.pad_multiple`), never past the
        model's ``max_length``; the extra positions are padding, which the attention
        mask hides, so every item's output is its own as at the exact width. A model
        padded on the left or without a ``max_length`` gets the exact width."""
        layout = self.layout
        rows = np.asarray(group, dtype=np.int64)
        lengths = self.lengths[rows]
        width = int(lengths.max()) if len(rows) else 0
        if multiple > 1 and width and layout.max_length and not layout.left_padding:
            width = max(width, min(padded_width(width, multiple), layout.max_length))
        columns = np.arange(width, dtype=np.int64)
        # Each position's place in the item: its column, or (left padding) the column
        # less the row's padding; positions outside the item are padding. A handful of
        # whole-batch operations: a batch costs a millisecond on a CPU.
        if layout.left_padding:
            relative = columns[None, :] - (width - lengths)[:, None]
            padding = relative < 0
            np.maximum(relative, 0, out=relative)
        else:
            relative = columns[None, :]
            padding = relative >= lengths[:, None]
        # A padding position may point past the last item: "clip" keeps it in bounds
        # (its value is masked below), and, unlike the default, needs no buffer.
        positions = self.offsets[rows][:, None] + relative
        out: dict[str, Any] = {}
        for key in layout.keys:
            buffer, tensor = _host((len(rows), width), pinned)
            if key == "input_ids":
                np.take(self.ids, positions, out=buffer, mode="clip")
                np.putmask(buffer, padding, layout.pad_id)
            elif key == "attention_mask":
                np.logical_not(padding, out=buffer, casting="unsafe")
            else:
                buffer[:] = self.first_type
                for starts, step in self.type_changes:
                    buffer += step * (relative >= starts[rows][:, None])
                if self.type_changes or self.first_type != layout.pad_type_id:
                    np.putmask(buffer, padding, layout.pad_type_id)
            out[key] = tensor
        out.update(layout.extras)
        return out


def _host(shape: tuple[int, int], pinned: bool) -> tuple[Ids, torch.Tensor]:
    """An int64 host buffer and the tensor over it; a pinned one comes from torch's
    caching host allocator, which hands a block out again only once the copies that
    read it have completed."""
    if not pinned:  # numpy's allocation is the cheaper of the two in a batch's budget
        array = np.empty(shape, dtype=np.int64)
        return array, torch.from_numpy(array)
    tensor = torch.empty(shape, dtype=torch.int64, pin_memory=True)
    return tensor.numpy(), tensor


# --- learning and checking a model's layout -------------------------------------------


def _probe_texts() -> list[str]:
    long_text = " ".join(f"word{i % 97} and" for i in range(_LONG_WORDS // 2))
    return [
        "hello world",
        "A somewhat longer sentence, with punctuation! And numbers: 1,234.5?",
        long_text,
        "naïve café — 東京 😀 tab\tand\nnewline",
        "x",
    ]


def _probe_pairs() -> list[tuple[str, str]]:
    texts = _probe_texts()
    long_text = texts[2]
    short_long = " ".join(texts[2].split()[:60])
    return [
        ("a query", texts[1]),
        ("what is x?", long_text),
        (long_text, "a short passage"),
        (long_text, long_text),
        (short_long, long_text),
        (texts[3], texts[0]),
    ]


def learn_layout(
    tokenizer: Any,
    preprocess: Callable[[list[Any]], dict[str, Any]],
    pairs: bool = False,
) -> InputLayout | None:
    """The layout of a model whose tokenizer is ``tokenizer`` (a Hugging Face fast
    tokenizer) and whose own input step is ``preprocess`` (``model.preprocess`` with the
    prompt and task its encode call uses), or ``None`` if none reproduces it.

    Args:
        tokenizer: The model's tokenizer (``model.tokenizer``).
        preprocess: Returns the model's input tensors for a list of texts (or pairs).
        pairs: Whether the model takes (query, passage) pairs (a CrossEncoder).
    """
    try:
        layout = _learn(tokenizer, preprocess, pairs)
    except Exception as exc:  # anything unusual means: tokenize as the model does
        log.info("no input layout", extra={"fields": {"why": f"{type(exc).__name__}: {exc}"}})
        return None
    return layout


def rust_tokenizer(tokenizer: Any) -> Any:
    """A copy of a fast tokenizer's Rust tokenizer without truncation or padding: ids of
    many texts in one call, as ``tokenizer(texts, add_special_tokens=False)`` gives them."""
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    rust = Tokenizer.from_str(backend.to_str())
    rust.no_truncation()
    rust.no_padding()
    rust.encode_special_tokens = bool(getattr(backend, "encode_special_tokens", False))
    return rust


def text_ids(rust: Any, texts: Sequence[str]) -> list[Ids]:
    """The ids of each text without special tokens, in one call of the Rust tokenizer."""
    encoded = rust.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(encoding.ids, dtype=np.int64) for encoding in encoded]


def _learn(
    tokenizer: Any, preprocess: Callable[[list[Any]], dict[str, Any]], pairs: bool
) -> InputLayout | None:
    if not getattr(tokenizer, "is_fast", False):
        return None
    rust = rust_tokenizer(tokenizer)
    a, b = (rust.encode(text, add_special_tokens=False).ids for text in (_TEXT_A, _TEXT_B))
    single = _template(rust.encode(_TEXT_A, add_special_tokens=True), [a])
    pair = _template(rust.encode(_TEXT_A, _TEXT_B, add_special_tokens=True), [a, b])
    if single is None or (pairs and pair is None):
        return None
    probes: list[Any] = _probe_pairs() if pairs else _probe_texts()
    expected = preprocess(probes)
    keys = tuple(k for k, v in expected.items() if isinstance(v, torch.Tensor))
    if "input_ids" not in keys or not set(keys) <= set(_TENSOR_KEYS):
        return None
    extras = tuple((k, v) for k, v in expected.items() if not isinstance(v, torch.Tensor))
    if any(isinstance(v, list | dict | np.ndarray) for _, v in extras):
        return None
    longest = int(expected["input_ids"].shape[1])
    items = [
        tuple(text_ids(rust, [text] if isinstance(text, str) else list(text))) for text in probes
    ]
    untruncated = max(sum(len(ids) for ids in item) for item in items)
    template = pair if pairs else single
    assert template is not None
    # The longest probe is past any model's limit: its length is the limit, unless the
    # model keeps everything.
    cut = longest < untruncated + template.specials
    layout = InputLayout(
        single=single,
        pair=pair,
        max_length=longest if cut else None,
        pad_id=int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        pad_type_id=int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
        left_padding=getattr(tokenizer, "padding_side", "right") == "left",
        truncate_left=getattr(tokenizer, "truncation_side", "right") == "left",
        keys=keys,
        extras=extras,
    )
    mine = layout.tensors([layout.fit(item) for item in items])
    same = all(
        torch.equal(mine[key], expected[key]) and mine[key].dtype == expected[key].dtype
        for key in keys
    )
    if not same:
        log.info("no input layout", extra={"fields": {"why": "probe tensors differ"}})
        return None
    return layout

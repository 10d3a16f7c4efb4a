"""Running models: the ModelManager, the dtype policy, devices and token budgets, the
one BatchRunner, and one module per model family (dense, sparse, rerank)."""

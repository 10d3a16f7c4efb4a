"""What a job reads: collections and models.

A collection is opened and recognised (:mod:`~shared.inputs.sources`; the CSV/TSV and
Parquet layouts in :mod:`~shared.inputs.tabular`), wherever it lives
(:mod:`~shared.inputs.locations`: a path or an ``s3://`` URL) and however it is
compressed (:mod:`~shared.inputs.compressed`). Models are resolved to their files
(:mod:`~shared.inputs.models`), and each document is cut into chunks by a model's
tokenizer (:mod:`~shared.inputs.chunking`), whose ids are staged with the chunks
(:mod:`~shared.inputs.tokens`).
"""

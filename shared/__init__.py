"""What the producer and the workers both need, in three sub-packages by concern.

- :mod:`shared.inputs`: what a job reads. Collections (their layouts, compressed and
  tabular files, local paths and S3 URLs), the model files and their tokenizers, and
  how a document is cut into chunks of token ids.
- :mod:`shared.control`: the control plane. The pipeline table, the job ledger in Redis,
  the Celery app, the settings, GPU leases and telemetry.
- :mod:`shared.records`: what the fleet writes and where it lives. Message and artifact
  types, ids, the wire format, the job store and object stores, errors and logs.

``inputs`` and ``control`` build on ``records`` and not on each other; ``records``
imports neither.
"""

"""What the producer and the workers both need: the pipeline table, message and artifact
types, ids, settings, the job store and object stores, the Celery app, and the job
ledger."""

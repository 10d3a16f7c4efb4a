"""What the producer and the workers both need: message and artifact types, settings,
the object store, the Celery app, and the job ledger."""

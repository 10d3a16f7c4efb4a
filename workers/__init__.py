"""The fleet's workers: Celery processes that do the pipeline's units of work.

- ``app`` / ``tasks``: the Celery app workers run, and one task per pipeline stage and
  aggregator step (names and queues from :mod:`shared.control.pipeline`).
- ``runtime``: a worker process's machinery, the same for every stage: the worker
  context, the task hooks (retries, tracing, ledger reporting), the GPU lease, model
  staging at start, thread shares, batch measurements.
- ``inference``: running models: the ModelManager, the dtype policy, devices and
  budgets, the one BatchRunner, and one module per model family (dense, sparse, rerank).
- ``ranking``: scoring and ordering without models: exact top-k over shards (the
  retrieve stage), fusion, sparse weights, evaluation.
- ``aggregate``: the aggregator's steps: plan the retrieve phase, fuse, export.
"""

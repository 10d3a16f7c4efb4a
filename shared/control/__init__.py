"""The control plane: what runs, in which order, where, and how far it has got.

The one pipeline table (:mod:`~shared.control.pipeline`: phases, stages, queues, task
names), the Celery app that carries its messages (:mod:`~shared.control.celery_app`),
the job ledger in Redis that records every unit's progress
(:mod:`~shared.control.ledger`), the fleet's settings from the environment
(:mod:`~shared.control.settings`), GPU leases by UUID (:mod:`~shared.control.leases`),
OpenTelemetry tracing (:mod:`~shared.control.telemetry`), and the fusion weights a
job's options give (:mod:`~shared.control.fusion_weights`).
"""

"""Celery workers: dense encoding (queue ``dense``) and the aggregator (``aggregate``)."""

"""Preparing a collection on the fleet: validate each read range, find duplicate ids
across ranges, then chunk and stage each range (the ``validate``, ``dedupe`` and
``chunk`` phases of :mod:`shared.control.pipeline`), so the producer only cuts the ranges."""

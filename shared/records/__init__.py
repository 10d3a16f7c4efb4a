"""What the fleet writes, and where it lives.

Every message and artifact type (:mod:`~shared.records.schemas`, msgspec Structs), the
ids of a job's things (:mod:`~shared.records.ids`), the only wire format
(:mod:`~shared.records.serializer`), object stores on disk and S3
(:mod:`~shared.records.storage`) and a job's layout in one
(:mod:`~shared.records.job_store`), the errors a user can act on with their exit codes
(:mod:`~shared.records.errors`), structured logs (:mod:`~shared.records.logs`) and how
sizes read in text (:mod:`~shared.records.text`). It imports nothing else of
``shared``.
"""

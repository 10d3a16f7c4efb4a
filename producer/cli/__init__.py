"""``embed-collections``: embed a collection with the fleet and follow it to the end.

One module per group of commands: :mod:`~producer.cli.run` (a new job),
:mod:`~producer.cli.job` (a started job: ``status``, ``resume``, ``cancel``),
:mod:`~producer.cli.fleet` (``jobs``, ``leases``, ``queues``) and :mod:`~producer.cli.export`;
:mod:`~producer.cli.app` holds the group and what they share.
"""

from producer.cli.app import main
from producer.cli.export import export_command
from producer.cli.fleet import jobs, leases, queues
from producer.cli.job import cancel, resume, status
from producer.cli.run import run

for command in (run, status, resume, cancel, jobs, leases, queues, export_command):
    main.add_command(command)

__all__ = ["main"]

"""``python -m producer.cli``: the ``embed-collections`` command."""

from producer.cli import main

main()

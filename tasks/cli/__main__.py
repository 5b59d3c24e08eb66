"""``python -m tasks.cli``: the ``embedq`` program, for where the entry point is not installed."""

from tasks.cli import main

main()

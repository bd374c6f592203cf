"""``python -m emguard.cli``: the same as the ``emguard`` command."""

from emguard.cli import main

main()

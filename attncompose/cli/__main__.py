"""``python -m attncompose.cli``: the ``attncompose`` command."""

from attncompose.cli import main

main()

"""``python -m gaqprune.cli``: the ``gaqprune`` command."""

from gaqprune.cli import main

main()

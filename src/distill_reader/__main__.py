"""``python -m distill_reader`` is the ``distill`` command."""

from distill_reader.cli import main

main()

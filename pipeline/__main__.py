"""``python -m pipeline`` is the ``medseg`` command."""

from pipeline.cli import main

main()

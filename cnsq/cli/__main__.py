"""``python -m cnsq.cli``."""

from cnsq.cli import run

run()

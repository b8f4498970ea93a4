"""``python -m cnsq.cli``."""

from . import run

run()

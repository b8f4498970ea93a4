"""``python -m cnsq.cli``."""

from . import main

main()

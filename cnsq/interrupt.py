"""Ctrl-C and SIGTERM as a request to stop taking work, so long jobs end cleanly.

The first signal sets ``requested``: the job stops reading input, finishes (or abandons) what is
in flight, saves its place and prints what was done. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class Stop:
    """A context manager that turns SIGINT and SIGTERM into ``requested`` (main thread only)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

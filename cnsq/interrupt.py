"""Ctrl-C and SIGTERM as a request to stop taking work, so long jobs end cleanly.

The first signal sets ``requested``: the job stops reading input, finishes (or abandons) what is
in flight, saves its place and prints what was done. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

# Code an interrupt must not be raised in. logging: between taking its module lock and giving it
# back, a KeyboardInterrupt left the lock held, and the next log line of any thread waited for
# ever (a demo stopped as it started hung, its download thread waiting and the main thread
# waiting for it). The import system: a library's bare `except:` around an optional import could
# swallow the interrupt. A signal that lands there is raised when that code is left.
_UNSAFE = ("logging.", "importlib.", "_frozen_importlib")
_RETRY_SECONDS = 0.05
_RETRIES = 100  # five seconds: past that, raise wherever it lands (a lock that is never freed)


def safe_to_raise(frame: FrameType | None) -> bool:
    """Whether a KeyboardInterrupt may be raised at ``frame`` (the frame a signal handler is
    given): no frame of the stack is logging's or the import system's."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module == "logging" or module.startswith(_UNSAFE):
            return False
        frame = frame.f_back
    return True


_deferred: dict[int, int] = {}  # signal → how many times it was put off


def raise_when_safe(signum: int, frame: FrameType | None) -> None:
    """Raise KeyboardInterrupt if ``frame`` allows it; else send ``signum`` to this process
    again a moment later (its handler runs again then)."""
    tries = _deferred.get(signum, 0)
    if safe_to_raise(frame) or tries >= _RETRIES:
        _deferred.pop(signum, None)
        raise KeyboardInterrupt
    _deferred[signum] = tries + 1
    timer = threading.Timer(_RETRY_SECONDS, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


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
        if self.requested:  # a second Ctrl-C: stop now (outside logging and imports)
            raise_when_safe(signum, frame)
            return
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

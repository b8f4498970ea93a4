"""A thread pool for downloads that adds threads only when work waits for one.

Why not a fixed ``ThreadPoolExecutor`` of ``DOWNLOAD_WORKERS`` threads: every thread that shares
the GIL makes the others wait for it around each socket call. On one machine (``cnsq run``, a
local tile server) 80 download threads cost about twice the context switches per tile of 4, and
that CPU is the model server's. A remote imagery endpoint with 100 ms latency, on the other hand,
needs dozens of downloads in flight. So the pool can start small and grow by one thread each
time a call is picked up later than ``patience`` after it was submitted, up to ``size``; threads
are kept once started. The default patience, 0.1 s, is long beside a busy CPU's scheduling delay
(a few ms while the model server holds every core) and short beside a remote endpoint's latency.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class ElasticPool:
    """Runs calls on up to ``size`` threads, starting ``start`` and adding one whenever a call
    waited longer than ``patience`` seconds in the queue.

    Args:
        size: the most threads (at least 1).
        start: threads started at once (at most ``size``).
        patience: seconds a call may wait before the pool adds a thread.
    """

    def __init__(self, size: int, start: int = 4, patience: float = 0.1,
                 name: str = "download"):
        self.size = max(1, size)
        self.patience = patience
        self.name = name
        self.calls: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = 0
        self.lock = threading.Lock()
        self.numbers = itertools.count(1)
        for _ in range(max(1, min(start, self.size))):
            self._add()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue ``fn(*args)``; its future holds the result or the exception."""
        future: Future = Future()
        self.calls.put((time.monotonic(), future, fn, args))
        return future

    def shutdown(self) -> None:
        """Let every thread finish the calls already queued, then stop."""
        with self.lock:
            count = self.threads
        for _ in range(count):
            self.calls.put(None)

    def _add(self) -> None:
        with self.lock:
            if self.threads >= self.size:
                return
            self.threads += 1
        threading.Thread(target=self._work, name=f"{self.name}-{next(self.numbers)}",
                         daemon=True).start()

    def _work(self) -> None:
        while True:
            item = self.calls.get()
            if item is None:
                return
            queued, future, fn, args = item
            if self.threads < self.size and time.monotonic() - queued > self.patience:
                self._add()  # this call waited for a thread: the next one should not
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - the caller gets it from the future
                future.set_exception(exc)
            else:
                future.set_result(result)

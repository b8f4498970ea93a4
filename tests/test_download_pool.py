"""The Lambda's download pool: grows only when calls wait, passes results and errors back."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lambda"))

from download_and_predict.pool import ElasticPool  # noqa: E402


class Tracker:
    """Counts how many calls run at once."""

    def __init__(self):
        self.running = 0
        self.peak = 0
        self.lock = threading.Lock()

    def slow(self, value: int) -> int:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return value * 2


def test_pool_grows_while_calls_wait_and_stops_at_its_size():
    tracker = Tracker()
    pool = ElasticPool(6, start=1, patience=0.01, name="grow")
    futures = [pool.submit(tracker.slow, i) for i in range(24)]
    wait(futures, timeout=30)
    assert [f.result() for f in futures] == [i * 2 for i in range(24)]
    assert 1 < pool.threads <= 6
    assert 1 < tracker.peak <= 6
    pool.shutdown()


def test_pool_stays_small_while_calls_are_picked_up_at_once():
    pool = ElasticPool(50, start=2, patience=1.0, name="quick")
    for burst in range(50):
        futures = [pool.submit(lambda a, b: a + b, burst, i) for i in range(10)]
        assert [f.result(timeout=10) for f in futures] == [burst + i for i in range(10)]
    assert pool.threads == 2
    pool.shutdown()


def test_an_exception_reaches_the_caller_and_the_pool_goes_on():
    pool = ElasticPool(2, start=1, name="errors")

    def fail(message: str) -> None:
        raise ValueError(message)

    with pytest.raises(ValueError, match="tile 1-2-3"):
        pool.submit(fail, "tile 1-2-3").result(timeout=10)
    assert pool.submit(len, "abc").result(timeout=10) == 3
    pool.shutdown()


def test_shutdown_finishes_queued_calls_then_stops_the_threads():
    tracker = Tracker()
    pool = ElasticPool(3, start=3, name="stopping")
    futures = [pool.submit(tracker.slow, i) for i in range(6)]
    pool.shutdown()
    assert [f.result(timeout=10) for f in futures] == [i * 2 for i in range(6)]
    deadline = time.monotonic() + 5
    while any(t.name.startswith("stopping-") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "pool threads still running after shutdown"
        time.sleep(0.01)

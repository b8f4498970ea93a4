"""Ctrl-C is raised where it cannot break the process (cnsq.interrupt): never inside logging
(its module lock was left held and every later log line waited for ever: a demo interrupted as
it started hung) nor inside the import system; there, it is raised once that code is left."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from cnsq.interrupt import safe_to_raise


def test_frames_inside_logging_or_an_import_are_not_safe(tmp_path, monkeypatch):
    seen: list[bool] = []

    class Probe(logging.Handler):
        def emit(self, record):
            seen.append(safe_to_raise(sys._getframe()))

    logger = logging.getLogger("cnsq-test-interrupt")
    logger.addHandler(Probe())
    try:
        logger.warning("probe")
    finally:
        logger.handlers.clear()
    (tmp_path / "cnsq_probe_import.py").write_text(
        "import sys\nfrom cnsq.interrupt import safe_to_raise\n"
        "SAFE = safe_to_raise(sys._getframe())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import cnsq_probe_import  # type: ignore[import-not-found]

    assert seen == [False] and cnsq_probe_import.SAFE is False
    assert safe_to_raise(sys._getframe()) is True


# A process whose Ctrl-C lands while a log line is being written (a handler that signals its own
# process and goes on writing for a while): the command's handler raises it after, not inside.
CHILD = r"""
import json, logging, os, signal, sys, threading, time, traceback
from cnsq.cli.app import _terminate

signal.signal(signal.SIGINT, _terminate)

class Slow(logging.Handler):
    def emit(self, record):
        os.kill(os.getpid(), signal.SIGINT)
        end = time.monotonic() + 0.3
        while time.monotonic() < end:  # Python code inside logging: the handler runs here
            pass

logger = logging.getLogger("slow")
logger.addHandler(Slow())
where = "never"
started = time.monotonic()
try:
    logger.warning("a line")
    while time.monotonic() - started < 5:
        time.sleep(0.01)
except KeyboardInterrupt:
    frames = traceback.extract_tb(sys.exc_info()[2])
    where = "logging" if any("logging" in f.filename for f in frames) else "after"
took = time.monotonic() - started
other = threading.Thread(target=logging.getLogger, args=("another",), daemon=True)
other.start()
other.join(2)
print(json.dumps({"where": where, "took": took, "lock_free": not other.is_alive()}))
"""


def test_a_ctrl_c_during_a_log_line_is_raised_after_it():
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                           timeout=30)
    said = json.loads(child.stdout.strip().splitlines()[-1])
    assert said["where"] == "after", child.stderr
    assert said["lock_free"]
    assert 0.3 <= said["took"] < 1.5  # at the end of the log line, not 5 s later

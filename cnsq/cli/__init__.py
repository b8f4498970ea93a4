"""The ``cnsq`` command line: a click group (``app``) and one module per group of commands,
each command a small function that parses options and delegates."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

# pyarrow's default allocator (mimalloc) keeps the pages it frees for reuse, so an export's
# peak memory is higher with it than with jemalloc, which is as fast (docs/performance.md) and
# which pyarrow's Linux builds include (elsewhere naming it would print a warning). pyarrow
# reads this when it first allocates (it is imported later, by the commands that need it); a
# user's own choice stands.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL",
                      "jemalloc" if sys.platform == "linux" else "system")


def _interrupted(*_: object) -> None:
    """Ctrl-C before a command runs (its handlers not yet in place): one line and 130, as every
    command says it, never Python's traceback and its death by the signal. Nothing is written
    yet, so nothing is left to close: the process ends at once (an exception raised inside an
    import could be caught or re-raised as another on its way out)."""
    sys.stderr.write("\nInterrupted.\n")
    sys.stderr.flush()
    os._exit(130)


# The commands' modules take a few tenths of a second to import, more on a busy machine: Ctrl-C
# meanwhile ends the program as above, and Python's own handler is back once they are in.
_early = (threading.current_thread() is threading.main_thread()
          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
if _early:
    signal.signal(signal.SIGINT, _interrupted)
try:
    from cnsq.cli import data, local, operate, stack, view  # noqa: E402,F401 - registers the commands
    from cnsq.cli.app import _model_url, _predict_url, _queue_region, main  # noqa: E402
finally:
    if _early:
        signal.signal(signal.SIGINT, signal.default_int_handler)

__all__ = ["main", "run", "_model_url", "_predict_url", "_queue_region"]


def run() -> None:
    """The ``cnsq`` program (its console script and ``python -m cnsq.cli``): :func:`main`,
    without the interpreter's last garbage collection.

    Why: at exit Python collects every object it still tracks (pyarrow's, numpy's, click's:
    tens of thousands), a share of a short command's time that counts (docs/performance.md,
    "Design choices, measured"). Frozen, they are left to the system, which frees the process's
    memory anyway; every file a command writes is closed (and renamed into place) before it
    returns. (Only here: a program that imports :func:`main` keeps its own exit.)
    """
    import atexit
    import gc

    atexit.register(gc.freeze)
    try:
        main()
    except KeyboardInterrupt:  # while click parses, before the command's own handling
        sys.stderr.write("\nInterrupted.\n")
        _leave(130)
    except SystemExit as exc:
        if exc.code == 130:  # interrupted: every command says it with 130
            _leave(130)
        raise


def _leave(status: int) -> NoReturn:
    """Exit with ``status`` as a normal exit does (atexit's functions run, the streams flushed)
    but without the interpreter's finalization, after which CPython may end the process by the
    signal itself when a Ctrl-C went through it: status -2 where 130 was asked, "Interrupted."
    printed (4 times in 120 Ctrl-Cs as the demo started, and once in CI). A script that stops
    cnsq must see 130."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say there
            pass
    os._exit(status)

# One line each in `cnsq --help` (click cuts a docstring's first sentence to fit the terminal).
SHORT_HELP = {
    "init": "Write a starter project (config, and optionally template and Lambda).",
    "compile": "Render the CloudFormation template.",
    "validate": "Lint the template and check the account (preflight).",
    "package": "Build (and upload) the Lambda zips.",
    "deploy": "Deploy the stack through a change set.",
    "outputs": "Print the stack's outputs.",
    "delete": "Delete the stack.",
    "setup": "Create or migrate the results table.",
    "download": "Download the results as CSV.",
    "convert-geojson": "Results CSV → thresholded GeoJSON.",
    "export": "Results CSV → GeoParquet, FlatGeobuf, GeoJSON or CSV.",
    "tiles": "List the tiles covering a GeoJSON area or COG imagery.",
    "imagery": "The image the worker sends the model for one tile (COGs).",
    "push": "Send tiles to the queue.",
    "redrive": "Move the dead letter queue back to the tile queue.",
    "status": "The run's numbers and what to change.",
    "estimate": "The time and the cost of N tiles for this config.",
    "verify": "Check every part of the stack (or of a local setup).",
    "tag-logs": "Tag the stack's log groups for cost tracking.",
    "gpu-util": "GPU utilisation of each model instance.",
    "model": "Build a TF Serving image from a SavedModel.",
    "serve": "Serve an ONNX model with TF Serving's REST API.",
    "tileserver": "Serve XYZ tiles from a folder or MBTiles.",
    "work": "Work an SQS queue with the Lambda's handler here.",
    "run": "Run the whole job on this machine.",
    "demo": "The whole pipeline on synthetic tiles, scored.",
    "view": "The predictions on a map over their imagery.",
}
for _name, _text in SHORT_HELP.items():
    if _name in main.commands:
        main.commands[_name].short_help = _text

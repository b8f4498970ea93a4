"""Arrow's compute functions, called by name.

Why not ``pyarrow.compute``: importing it builds a Python wrapper, with its docstring, for each
of Arrow's hundreds of functions, time every export would pay (docs/performance.md).
``pyarrow._compute`` holds the same function registry and options classes without the wrappers;
a pyarrow without it gets the public module.
"""

from __future__ import annotations

from typing import Any

try:
    from pyarrow._compute import (
        CastOptions,
        MatchSubstringOptions,
        TrimOptions,
        call_function,
    )

    SOURCE = "pyarrow._compute"
except ImportError:  # a pyarrow that moved its private module: the public one has the same names
    from pyarrow.compute import (  # type: ignore[assignment]  # noqa: F401
        CastOptions,
        MatchSubstringOptions,
        TrimOptions,
        call_function,
    )

    SOURCE = "pyarrow.compute"

__all__ = ["CastOptions", "MatchSubstringOptions", "TrimOptions", "call"]


def call(name: str, *args: Any, options: Any = None) -> Any:
    """The Arrow compute function ``name`` over ``args`` (arrays or scalars)."""
    return call_function(name, list(args), options)

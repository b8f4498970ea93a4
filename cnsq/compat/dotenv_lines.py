"""A ``.env`` file read line by line, with the number of a line that is not ``KEY=value``.

python-dotenv's public ``dotenv_values`` skips such a line with a logged warning; its parser
(``dotenv.parser.parse_stream``, not public) says which line it was, which a config error must
name. Without that parser, the public reader: the same values, no line for a bad one.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Binding:
    """One line of a ``.env``: its key and value, or ``error`` with its text and number."""

    key: str | None
    value: str | None
    line: int
    text: str
    error: bool


def bindings(text: str) -> Iterator[Binding]:
    """The lines of a ``.env`` file's ``text``, in order (blank and comment lines have no key)."""
    try:
        from dotenv.parser import parse_stream
    except ImportError:
        yield from _public(text)
        return
    for item in parse_stream(io.StringIO(text)):
        yield Binding(item.key, item.value, item.original.line, item.original.string, item.error)


def _public(text: str) -> Iterator[Binding]:
    from dotenv import dotenv_values

    for key, value in dotenv_values(stream=io.StringIO(text)).items():
        yield Binding(key, value, 0, "", False)

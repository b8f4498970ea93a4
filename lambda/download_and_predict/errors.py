"""The handler's own errors, under one base: what it raises on purpose, with a message that says
what is wrong. Anything else escaping it is a bug."""

from __future__ import annotations


class HandlerError(Exception):
    """Every error the Lambda package raises on purpose."""


class SettingsError(HandlerError, ValueError):
    """The environment is missing a variable or holds a malformed one (raised at cold start)."""


class BadEvent(HandlerError, ValueError):
    """An event that is not SQS's ``{"Records": [...]}`` of objects."""


class BadRecord(HandlerError, ValueError):
    """A record whose body is not ``{"x": int, "y": int, "z": int}`` for a valid tile."""


class StepFailed(HandlerError):
    """A step failed for some records; ``reason`` is the label counted in the log line."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class HttpError(HandlerError):
    """A request that got no HTTP answer (connection, TLS, proxy, malformed URL)."""


class HttpTimeout(HttpError):
    """The connection or a read timed out."""


class HttpDeadline(HttpTimeout):
    """The request's total deadline passed: its connection was closed, nothing reads on."""


class HttpRefused(HttpError):
    """A redirect to an address no imagery lives at: link-local, the instance metadata service."""


class HttpTooLarge(HttpError):
    """The answer's body is over the size allowed (stopped while read, never held whole)."""


class AdminError(HandlerError):
    """A request the admin function cannot carry out; its message is returned to the caller."""

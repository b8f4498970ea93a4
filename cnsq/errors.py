"""Exceptions that the CLI turns into one clear line and a non-zero exit."""

import re
from collections.abc import Callable

_OPTION = re.compile(r"\{option:(\w+)\}")


class CnsqError(Exception):
    """An error the user can act on; its message says what is wrong and where.

    A message names a parameter of the function that raised it with :func:`option`, never a
    command-line flag: ``str()`` shows the parameter's name (what a program calling the library
    passes) and :meth:`worded` the caller's own words for it (the CLI passes each command's
    flags, cnsq.cli.app)."""

    exit_code = 1

    def __init__(self, *args: object):
        self.template = args[0] if args and isinstance(args[0], str) else None
        if self.template is not None:
            args = (worded(self.template, lambda name: name), *args[1:])
        super().__init__(*args)

    def worded(self, name_of: Callable[[str], str]) -> str:
        """The message with each parameter named by ``name_of(parameter)``."""
        return worded(self.template, name_of) if self.template is not None else str(self)


class ConfigError(CnsqError):
    """config.yml, the deployment or .env is malformed or holds a bad value."""


class TemplateError(CnsqError):
    """The CloudFormation template failed to render, parse or lint."""


class PackageError(CnsqError):
    """The Lambda package could not be built."""


class AwsError(CnsqError):
    """An AWS call failed; the message says why and how to fix it."""


class AwsUnreachable(AwsError):
    """Nothing answered: no network, a dead proxy or endpoint. ``reason``: botocore's words."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


class DeployError(CnsqError):
    """A deploy or delete did not reach its goal (failed stack, refused change)."""


class Interrupted(CnsqError):
    """Ctrl-C or SIGTERM stopped the command; the message says what was kept."""

    exit_code = 130


def option(name: str) -> str:
    """How a message names the parameter ``name`` of the function that raised it: the CLI
    shows the command's flag there (``--thresh_ind``), a program calling the library the
    parameter's name (``thresh_ind``)."""
    return "{option:" + name + "}"


def worded(text: str, name_of: Callable[[str], str]) -> str:
    """``text`` with each :func:`option` in it replaced by ``name_of(parameter)``."""
    return _OPTION.sub(lambda match: name_of(match.group(1)), text)

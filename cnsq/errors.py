"""Exceptions that the CLI turns into one clear line and a non-zero exit."""


class CnsqError(Exception):
    """An error the user can act on; its message says what is wrong and where."""

    exit_code = 1


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

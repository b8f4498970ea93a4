"""Where the results database is: an explicit URL, DATABASE_URL, or the deployed stack's secret."""

from __future__ import annotations

import json

from .errors import CnsqError


def url_from_secret(secret: dict) -> str:
    """An RDS Secrets Manager secret (username, password, host, port, dbname) → a libpq URL."""
    from download_and_predict.base import secret_to_url  # the Lambda reads it the same way

    missing = [k for k in ("username", "password", "host") if k not in secret]
    if missing:
        raise CnsqError(f"the database secret has no {', '.join(missing)} "
                        "(is the database attached to it yet?)")
    return secret_to_url(secret)


def url_from_stack(aws, stacks, stack_name: str) -> str:
    """Read the stack's ``databaseSecretArn`` output and the secret behind it."""
    outputs = stacks.outputs(stack_name)
    arn = outputs.get("databaseSecretArn")
    if not arn:
        raise CnsqError(f"stack {stack_name} has no databaseSecretArn output; pass the database "
                        "URL explicitly")
    value = aws.client("secretsmanager").get_secret_value(SecretId=arn)
    return url_from_secret(json.loads(value["SecretString"]))

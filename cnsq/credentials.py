"""Where the results database is: an explicit URL, DATABASE_URL, or the deployed stack's secret.

A private database is reached through the admin function instead (cnsq/admin.py)."""

from __future__ import annotations

import json

from . import layout
from .aws import collect
from .errors import CnsqError


def url_from_secret(secret: dict) -> str:
    """An RDS Secrets Manager secret (username, password, host, port, dbname) → a libpq URL."""
    from download_and_predict.writer import secret_to_url  # the Lambda reads it the same way

    missing = [k for k in ("username", "password", "host") if k not in secret]
    if missing:
        raise CnsqError(f"the database secret has no {', '.join(missing)} "
                        "(is the database attached to it yet?)")
    return secret_to_url(secret)


def url_from_stack(aws, stacks, stack_name: str) -> str:
    """The stack's database URL: RDS's own secret for ``dbInstanceIdentifier`` (host and port
    from the instance), or the ``databaseSecretArn`` of a stack deployed before cnsq 0.3."""
    from download_and_predict.writer import managed_secret_arn

    outputs = stacks.outputs(stack_name)
    instance, arn = outputs.get(layout.DB_INSTANCE), outputs.get(layout.DB_SECRET_ARN)
    if not instance and not arn:
        raise CnsqError(f"stack {stack_name} has no dbInstanceIdentifier output; pass the "
                        "database URL explicitly")
    where: dict = {}
    if instance:
        try:
            arn = managed_secret_arn(aws.client("rds"), instance)
        except LookupError as exc:
            raise CnsqError(str(exc)) from None
        found = collect(aws.client("rds"), "describe_db_instances", "DBInstances",
                        DBInstanceIdentifier=instance)
        endpoint = found[0].get("Endpoint") or {}
        where = {"host": endpoint.get("Address"), "port": endpoint.get("Port", 5432),
                 "dbname": "ResultsDB"}
    value = aws.client("secretsmanager").get_secret_value(SecretId=arn)
    return url_from_secret({**json.loads(value["SecretString"]), **where})

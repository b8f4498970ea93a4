"""The Lambda entry point: ``download_and_predict.handler.handler``.

Configuration comes from the environment (TILE_ENDPOINT, TILE_ACCESS_TOKEN or
TILE_ACCESS_TOKEN_SECRET_ARN, PREDICTION_ENDPOINT, and DATABASE_INSTANCE/HOST/PORT on AWS or
DATABASE_URL locally). The app — its HTTP connection pools and database
connection — is built at cold start and reused by every warm invocation.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from .base import (
    DownloadAndPredict,
    ResultsWriter,
    Settings,
    managed_secret_arn,
    mask,
    register_secret,
    secret_to_url,
)
from .errors import SettingsError

LOG = logging.getLogger("download_and_predict")
LOG.setLevel(logging.INFO)


def database_url(settings: Settings) -> str:
    """DATABASE_URL, or the URL built from RDS's own secret (read once, never logged).

    On AWS the stack gives the instance, host and port; the credentials are in the secret RDS
    manages for the instance, found through ``rds:DescribeDBInstances``. RDS rotates that
    password: the writer calls this again when the database refuses the one it has.
    """
    if settings.database_url:
        return settings.database_url
    import boto3  # provided by the Lambda runtime

    if not (settings.database_secret_arn or settings.database_instance):
        raise SettingsError("no DATABASE_URL, DATABASE_SECRET_ARN or DB_INSTANCE: nowhere to "
                            "write results")
    arn = settings.database_secret_arn or managed_secret_arn(
        boto3.client("rds"), settings.database_instance or "")
    secret = json.loads(
        boto3.client("secretsmanager").get_secret_value(SecretId=arn)["SecretString"])
    register_secret(str(secret.get("password", "")))
    if settings.database_host:  # RDS's secret holds the username and password only
        secret.update(host=settings.database_host, port=settings.database_port,
                      dbname=settings.database_name)
    return secret_to_url(secret, settings.database_sslmode, settings.database_sslrootcert)


def resolve_secret_envs(env: dict[str, str], secrets: Any = None) -> dict[str, str]:
    """``NAME_SECRET_ARN`` → ``NAME`` with the secret's value, for every such variable.

    The stack keeps secret Lambda settings (the tile token) in Secrets Manager rather than in
    the function's configuration; they are read here, once per cold start.
    """
    wanted = {k[: -len("_SECRET_ARN")]: v for k, v in env.items()
              if k.endswith("_SECRET_ARN") and k != "DATABASE_SECRET_ARN" and v}
    if not wanted:
        return env
    if secrets is None:
        import boto3

        secrets = boto3.client("secretsmanager")
    resolved = dict(env)
    for name, arn in wanted.items():
        resolved[name] = secrets.get_secret_value(SecretId=arn)["SecretString"]
    return resolved


def build(env: dict[str, str], app_class: type[DownloadAndPredict] = DownloadAndPredict,
          ) -> DownloadAndPredict:
    """Cold start: read the environment, open the HTTP pools and the database connection.

    A database that cannot be reached now is retried at the next write, so the records of this
    invocation fail (and come back) instead of the whole function failing to start.
    """
    settings = Settings.from_env(resolve_secret_envs(env))
    register_secret(settings.tile_token)  # never in a log line, whatever carries it
    refresh = None if settings.database_url else (lambda: database_url(settings))
    writer = ResultsWriter(database_url(settings), settings.database_timeout, refresh)
    try:
        writer.connect()
    except Exception as exc:  # noqa: BLE001 - reported, retried on the next write
        LOG.error("cannot connect to the results database %s: %s",
                  mask(writer.url).split("@")[-1], mask(str(exc)).splitlines()[0])
        writer.close()
    return app_class(settings, writer)


def make_handler(app_class: type[DownloadAndPredict] = DownloadAndPredict):
    """A Lambda handler for ``app_class``, built at the first (cold) invocation and reused."""
    state: dict[str, DownloadAndPredict] = {}

    def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
        """SQS event → ``{"batchItemFailures": [...]}`` naming only the records that failed."""
        if "app" not in state:
            state["app"] = build(dict(os.environ), app_class)
        return state["app"].run(event, context)

    return handler


handler = make_handler()

"""The Lambda entry point: ``download_and_predict.handler.handler``.

Configuration comes from the environment (TILE_ENDPOINT, TILE_ACCESS_TOKEN, PREDICTION_ENDPOINT,
and DATABASE_SECRET_ARN on AWS or DATABASE_URL locally). The app — its HTTP connection pools and database
connection — is built at cold start and reused by every warm invocation.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from .base import DownloadAndPredict, ResultsWriter, Settings, mask, secret_to_url

LOG = logging.getLogger("download_and_predict")
LOG.setLevel(logging.INFO)


def database_url(settings: Settings) -> str:
    """DATABASE_URL, or the URL built from the Secrets Manager secret (read once, never logged)."""
    if settings.database_url:
        return settings.database_url
    import boto3  # provided by the Lambda runtime

    secret = boto3.client("secretsmanager").get_secret_value(SecretId=settings.database_secret_arn)
    return secret_to_url(json.loads(secret["SecretString"]))


def build(env: dict[str, str], app_class: type[DownloadAndPredict] = DownloadAndPredict,
          ) -> DownloadAndPredict:
    """Cold start: read the environment, open the HTTP pools and the database connection.

    A database that cannot be reached now is retried at the next write, so the records of this
    invocation fail (and come back) instead of the whole function failing to start.
    """
    settings = Settings.from_env(env)
    writer = ResultsWriter(database_url(settings))
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
        return state["app"].run(event)

    return handler


handler = make_handler()

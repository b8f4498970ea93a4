"""A database URL from an RDS Secrets Manager secret (the deployed stack's is read by
cnsq.stack.deployed; a private database is reached through the admin function, cnsq/stack/admin.py)."""

from __future__ import annotations

from cnsq.errors import CnsqError
from download_and_predict.writer import secret_to_url


def url_from_secret(secret: dict) -> str:
    """An RDS Secrets Manager secret (username, password, host, port, dbname) → a libpq URL."""

    missing = [k for k in ("username", "password", "host") if k not in secret]
    if missing:
        raise CnsqError(f"the database secret has no {', '.join(missing)} "
                        "(is the database attached to it yet?)")
    return secret_to_url(secret)

"""Masking: the one redaction function of cnsq and the Lambda.

Every message that may carry a URL, a connection string or a value from the environment goes
through :func:`mask` before it is printed, logged or sent to a page. It hides, in this order:

1. every registered secret (the tile token, a database password), in every form it can take in
   a message: as it is, percent-encoded (as a URL carries it, whole or as requests re-quotes
   it), form-encoded, and escaped as JSON or ``repr`` writes it — first, so that no later rule
   can cut a secret in two and leave a tail;
2. the password of a URL's user information, empty user name included, up to the last ``@``
   of the URL (a password may hold ``@``, ``/``, ``?`` or ``#`` unencoded);
3. a ``password=`` of a libpq ``key=value`` connection string, quoted or not;
4. the value of any query or fragment parameter whose name says it carries a credential
   (``access_token``, ``access-token``, ``api_key``, ``X-Amz-Signature``, ``sig`` …).

A database URL is read as libpq reads it (:func:`register_connection_string`), so the password
libpq would use is the one masked.
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote, quote_plus, unquote

# Values shorter than this are not registered: masking "abc" everywhere would maim messages.
MIN_SECRET = 4
_KNOWN: set[str] = set()

# A parameter whose name holds one of these words carries a credential.
_PARAM = re.compile(
    r"(?i)([?&;#](?:[\w.-]*(?:token|key|secret|sig|signature|password|passwd|pwd|credential|auth)"
    r"[\w.-]*)=)[^&#\s'\"]*")
# scheme://user:password@host — user possibly empty; the password runs to the last @ of the URL.
_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^:/@\s]*:)\S*@")
# libpq key=value: password=value, password = 'quoted \' value'
_KEYWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def _forms(value: str) -> set[str]:
    """The ways a value is written in a message."""
    forms = {value, quote(value, safe=""), quote(value, safe="/:@&=+$,;?#[]!*'()~"),
             quote_plus(value), json.dumps(value)[1:-1], repr(value)[1:-1]}
    return {f for f in forms if len(f) >= MIN_SECRET}


def register_secret(value: str | None) -> None:
    """Remember a secret value (the tile token, a password) so that :func:`mask` hides it,
    in every form, wherever it appears, even outside a URL."""
    if value and len(value) >= MIN_SECRET:
        _KNOWN.update(_forms(value))


def connection_password(dsn: str) -> str | None:
    """The password in a PostgreSQL URL or ``key=value`` string, as libpq reads it, or None.

    Where libpq cannot parse it (an unencoded ``/`` in a URL's password reads as a host and a
    port), the text between ``user:`` and the URL's last ``@`` is taken: what the user meant.
    """
    found = None
    try:
        from psycopg2.extensions import parse_dsn

        found = parse_dsn(dsn).get("password")
    except Exception:  # noqa: BLE001 - not parseable by libpq (or no psycopg2): read it ourselves
        pass
    if found is None:
        match = re.match(r"^[a-zA-Z][\w+.-]*://[^:/@\s]*:(\S*)@", dsn)
        found = unquote(match.group(1)) if match else None
    return found or None


def register_connection_string(dsn: str | None) -> None:
    """Register a connection string's password (and, for one libpq misreads, the pieces a
    message could show of it: an unencoded ``/``, ``?`` or ``#`` splits it into host-like and
    port-like parts)."""
    if not dsn:
        return
    password = connection_password(dsn)
    if not password:
        return
    register_secret(password)
    for piece in re.split(r"[/?#@:]", password):
        register_secret(piece)
    match = re.match(r"^[a-zA-Z][\w+.-]*://[^:/@\s]*:(\S*)@", dsn)
    if match:  # as written, encoded or not
        register_secret(match.group(1))


def mask(text: str) -> str:
    """``text`` fit to print, log or send to a page (see the module's rules)."""
    for value in sorted(_KNOWN, key=len, reverse=True):
        if value in text:
            text = text.replace(value, "***")
    text = _USERINFO.sub(r"\1***@", text)
    text = _KEYWORD.sub(r"\1***", text)
    return _PARAM.sub(r"\1***", text)

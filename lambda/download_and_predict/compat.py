"""The private APIs of requests and urllib3 the handler's HTTP uses, each in one place with the
public path as its fallback (requirements.txt bounds both libraries below their next major).

- ``HTTPConnectionPool._get_conn``: the one place a pool hands a connection to a request, where
  the request's deadline learns the socket it must shut (http.DeadlineWatch). A urllib3 without
  it gets the pool as it is: each read is still bounded by the read timeout, but a body that
  trickles in under it is no longer cut at the deadline.
- ``Response._content``: requests' cache of the body, filled from a read that counted its bytes,
  so that ``.content``, ``.text`` and ``.json()`` work as on any response (the handler's
  override surface uses them). requests has no public way to set it; it has kept this name
  since its first release, and tests/services/test_lambda.py fails if it stops working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import requests


def watched_pool(pool_class: type, connection_class: type, on_connection: Callable[[Any], None]
                 ) -> type:
    """``pool_class`` making connections of ``connection_class`` and calling ``on_connection``
    with each one it hands out, in the requesting thread."""
    if not callable(getattr(pool_class, "_get_conn", None)):
        return type(f"Plain{pool_class.__name__}", (pool_class,), {"ConnectionCls": connection_class})

    class Watched(pool_class):  # type: ignore[misc, valid-type]
        ConnectionCls = connection_class

        def _get_conn(self, timeout: float | None = None) -> Any:
            connection = super()._get_conn(timeout)
            on_connection(connection)
            return connection

    return Watched


def keep_body(response: requests.Response, body: bytes) -> None:
    """Make ``body`` (already read from ``response``'s stream) what ``response.content`` is."""
    response._content = body

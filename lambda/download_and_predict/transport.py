"""HTTP for the handler: pooled urllib3 connections, with proxy and CA settings read once.

Why not ``requests``: measured per tile, the handler spent more CPU inside requests than on
everything else it does — merging session settings and hooks and, whenever a proxy or CA-bundle
variable is set, scanning the whole environment again on every request. On Lambda that CPU is
billed; on one machine (``cnsq run``) it is taken from the model server. What requests did for the
handler is kept here, decided once at cold start from the environment the app is built with:
redirects are followed, ``HTTP(S)_PROXY``/``ALL_PROXY``/``NO_PROXY`` route each host (loopback
always goes direct), and ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` (else certifi's bundle)
verify TLS.
"""

from __future__ import annotations

import ipaddress
import json
import os
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import urlsplit
from urllib.request import proxy_bypass_environment

import urllib3

USER_AGENT = "cnsq-download-and-predict"


class TransportError(Exception):
    """No HTTP answer: connection refused or reset, DNS, TLS, a dead proxy, too many redirects."""


class TransportTimeout(TransportError):
    """No answer within the timeout."""


class Response(NamedTuple):
    """An HTTP answer, read in full."""

    status: int
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return json.loads(self.data)


def proxies_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """``{"http": url, "https": url, "all": url, "no": "host,…"}`` from ``*_PROXY`` variables.

    As in urllib, a lower-case variable wins over its upper-case twin; a proxy given without a
    scheme (``proxy:3128``) is an ``http://`` proxy, as requests reads it.
    """
    found: dict[str, str] = {}
    for name in sorted(env, key=str.islower):  # upper-case first, lower-case overrides
        value = env[name]
        if value and name.lower().endswith("_proxy"):
            scheme = name.lower()[: -len("_proxy")]
            if scheme != "no" and "://" not in value:
                value = "http://" + value
            found[scheme] = value
    return found


def ca_bundle_from_env(env: Mapping[str, str]) -> str | None:
    """The CA bundle to verify TLS with: ``REQUESTS_CA_BUNDLE``, ``CURL_CA_BUNDLE``, else
    certifi's (what requests used), else None for the system's default store."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if env.get(name):
            return env[name]
    try:
        import certifi
    except ImportError:
        return None
    return certifi.where()


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address: never sent to a proxy, which cannot reach this
    machine's loopback (``cnsq run``'s model server, a local tile server), as Go's HTTP client
    does too."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Transport:
    """GET and POST with pooled keep-alive connections; thread-safe.

    Args:
        pool_size: connections kept per host (as many as requests to it run at once).
        proxies: as returned by :func:`proxies_from_env`.
        ca_bundle: a PEM file or a directory of certificates; None for the system's store.
    """

    def __init__(self, pool_size: int = 16, proxies: Mapping[str, str] | None = None,
                 ca_bundle: str | None = None):
        self.options: dict[str, Any] = {
            "num_pools": 16, "maxsize": max(1, pool_size), "block": False,
            "headers": {"User-Agent": USER_AGENT},
            # Our own retries (with backoff, per step) decide what is retried; urllib3 only
            # follows redirects, up to 5, as requests did.
            "retries": urllib3.Retry(total=None, connect=0, read=0, status=0, other=0,
                                     redirect=5, raise_on_status=False),
            "cert_reqs": "CERT_REQUIRED",
        }
        if ca_bundle:
            self.options["ca_cert_dir" if os.path.isdir(ca_bundle) else "ca_certs"] = ca_bundle
        self.proxies = dict(proxies or {})
        self.direct = urllib3.PoolManager(**self.options)
        self.via_proxy: dict[str, urllib3.ProxyManager] = {}
        self.routes: dict[tuple[str, str], urllib3.PoolManager] = {}  # (scheme, host) → manager
        self.lock = threading.Lock()

    def manager_for(self, url: str) -> urllib3.PoolManager:
        """The direct pools or a proxy's, decided once per scheme and host."""
        parts = urlsplit(url)
        key = (parts.scheme.lower(), parts.hostname or "")
        manager = self.routes.get(key)
        if manager is None:
            manager = self._route(*key)
            self.routes[key] = manager
        return manager

    def _route(self, scheme: str, host: str) -> urllib3.PoolManager:
        proxy = self.proxies.get(scheme) or self.proxies.get("all")
        if not proxy or is_loopback(host) or proxy_bypass_environment(host, self.proxies):
            return self.direct
        with self.lock:
            if proxy not in self.via_proxy:
                self.via_proxy[proxy] = urllib3.ProxyManager(proxy, **self.options)
            return self.via_proxy[proxy]

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, connect_timeout: float = 3.05,
                read_timeout: float = 10.0) -> Response:
        """Send one request and read the whole answer.

        Raises:
            TransportTimeout: connecting or reading took longer than its timeout.
            TransportError: no answer (refused, reset, TLS, proxy, redirects, a malformed URL).
        """
        timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        try:
            answer = self.manager_for(url).request(method, url, body=body, headers=headers,
                                                   timeout=timeout, preload_content=True)
        except urllib3.exceptions.MaxRetryError as exc:
            raise _explain(exc.reason or exc) from None
        except urllib3.exceptions.HTTPError as exc:
            raise _explain(exc) from None
        return Response(answer.status, answer.data)

    def get(self, url: str, connect_timeout: float = 3.05, read_timeout: float = 10.0) -> Response:
        return self.request("GET", url, connect_timeout=connect_timeout, read_timeout=read_timeout)

    def post_json(self, url: str, payload: Any, connect_timeout: float = 3.05,
                  read_timeout: float = 60.0) -> Response:
        return self.request("POST", url, json.dumps(payload).encode(),
                            {"Content-Type": "application/json"}, connect_timeout, read_timeout)


def _explain(error: BaseException) -> TransportError:
    """urllib3's exception → ours, saying what failed without urllib3's wrapping."""
    if isinstance(error, urllib3.exceptions.ProxyError):
        cause = error.args[1] if len(error.args) > 1 else error.original_error
        inner = _explain(cause) if isinstance(cause, BaseException) else TransportError(str(error))
        return type(inner)(f"proxy error: {inner}")
    # NewConnectionError (refused, DNS) subclasses ConnectTimeoutError in urllib3: not a timeout.
    if isinstance(error, urllib3.exceptions.NewConnectionError):
        conn = getattr(error, "conn", None)
        where = f"{conn.host}:{conn.port}" if conn is not None else "the server"
        reason = str(error).split("Failed to establish a new connection: ")[-1]
        return TransportError(f"cannot connect to {where}: {reason}")
    if isinstance(error, urllib3.exceptions.TimeoutError):
        return TransportTimeout(f"timed out ({error})")
    if isinstance(error, urllib3.exceptions.MaxRetryError):
        return TransportError("too many redirects")
    return TransportError(str(error))

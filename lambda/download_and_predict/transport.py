"""HTTP for the handler: keep-alive connections from the standard library, settings read once.

Why not ``requests`` or ``urllib3``: measured per tile, the handler spent more CPU inside the
HTTP client than on everything else it does. One 25 KB tile GET over a kept-alive loopback
connection cost 161 µs of client CPU through urllib3 and 72 µs through this module (57 µs of it
in ``http.client``, which urllib3 wraps too); requests added settings merging and, whenever a
proxy or CA variable is set, a scan of the whole environment on every request. On Lambda that
CPU is billed; on one machine (``cnsq run``) it is taken from the model server. So this module
keeps what the handler needs from those libraries, on ``http.client``, and decides everything it
can once at cold start:

- connections are pooled per host and reused (a connection the server closed while idle is
  replaced once, transparently: CDNs close idle keep-alive connections at will);
- redirects are followed, up to 5, as requests did;
- ``HTTP(S)_PROXY``/``ALL_PROXY``/``NO_PROXY`` route each host (loopback always goes direct):
  plain HTTP in absolute form through the proxy, HTTPS in a CONNECT tunnel;
- ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` (else certifi's bundle) verify TLS;
- chunked bodies are read by ``http.client``; a gzip or deflate body is decoded (none is asked
  for: tiles are compressed images already, and compressing predictions costs the model server).
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import os
import ssl
import threading
import zlib
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import proxy_bypass_environment

USER_AGENT = "cnsq-download-and-predict"
MAX_REDIRECTS = 5
REDIRECTS = {301, 302, 303, 307, 308}


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


class Base64Text(str):
    """Base64 text that needs no escaping in JSON: :func:`encode_json` copies it as it is.

    Make one with :meth:`of`, which encodes the bytes itself, so the text is base64 by
    construction (its alphabet, ``A-Z a-z 0-9 + / =``, has nothing JSON escapes).
    """

    __slots__ = ()

    @classmethod
    def of(cls, data: bytes) -> Base64Text:
        return cls(base64.b64encode(data).decode("ascii"))


def encode_json(payload: Any) -> bytes:
    """``json.dumps(payload).encode()``, byte for byte, made faster for TF Serving's image
    payload, ``{"instances": [{"image_bytes": {"b64": Base64Text}}, …]}``.

    Why: the JSON encoder checks every character of every string for escapes — 50 µs per 25 KB
    tile, as much as downloading it. Base64 text has nothing to escape, so for that shape the
    body is joined from the texts directly; any other payload goes to ``json.dumps``.
    """
    texts = _image_texts(payload)
    if texts is None:
        return json.dumps(payload).encode()
    return (b'{"instances": [{"image_bytes": {"b64": "'
            + b'"}}, {"image_bytes": {"b64": "'.join(text.encode("ascii") for text in texts)
            + b'"}}]}')


def _image_texts(payload: Any) -> list[Base64Text] | None:
    """The b64 texts when ``payload`` has exactly the image shape, else None."""
    if type(payload) is not dict or len(payload) != 1:
        return None
    instances = payload.get("instances")
    if type(instances) is not list or not instances:
        return None
    texts = []
    for instance in instances:
        if type(instance) is not dict or len(instance) != 1:
            return None
        holder = instance.get("image_bytes")
        if type(holder) is not dict or len(holder) != 1:
            return None
        text = holder.get("b64")
        if type(text) is not Base64Text:
            return None
        texts.append(text)
    return texts


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


class Proxy(NamedTuple):
    """A forward proxy: where to connect, and the header that authenticates to it, if any."""

    host: str
    port: int
    authorization: str | None

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """Raises TransportError for a proxy URL without a host or with a bad port."""
        try:
            parts = urlsplit(url)
            port = parts.port or 80
        except ValueError as exc:
            raise TransportError(f"proxy error: bad proxy URL {url!r}: {exc}") from None
        if not parts.hostname:
            raise TransportError(f"proxy error: bad proxy URL {url!r}: no host")
        authorization = None
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        return cls(parts.hostname, port, authorization)


class Target(NamedTuple):
    """A URL split the way a request needs it."""

    scheme: str
    host: str
    port: int
    path: str  # what goes on the request line when connected straight to the host
    url: str

    @classmethod
    def parse(cls, url: str) -> Target:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise TransportError(f"bad URL {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise TransportError(f"bad URL {url!r}: the scheme must be http or https")
        if not parts.hostname:
            raise TransportError(f"bad URL {url!r}: no host")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(scheme, parts.hostname, port or (443 if scheme == "https" else 80), path, url)


class Transport:
    """GET and POST over pooled keep-alive connections; thread-safe.

    Args:
        pool_size: idle connections kept per host (as many as requests to it run at once).
        proxies: as returned by :func:`proxies_from_env`.
        ca_bundle: a PEM file or a directory of certificates; None for the system's store.
    """

    def __init__(self, pool_size: int = 16, proxies: Mapping[str, str] | None = None,
                 ca_bundle: str | None = None):
        self.pool_size = max(1, pool_size)
        self.proxies = dict(proxies or {})
        self.ca_bundle = ca_bundle
        self._tls: ssl.SSLContext | None = None
        self.routes: dict[tuple[str, str], Proxy | None] = {}  # (scheme, host) → proxy or direct
        self.idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self.lock = threading.Lock()

    # -- where a request goes ------------------------------------------------------------------

    def proxy_for(self, url: str) -> Proxy | None:
        """The proxy a URL goes through, or None for a direct connection; decided once per
        scheme and host."""
        target = Target.parse(url)
        return self._route(target.scheme, target.host)

    def _route(self, scheme: str, host: str) -> Proxy | None:
        key = (scheme, host)
        if key in self.routes:
            return self.routes[key]
        proxy_url = self.proxies.get(scheme) or self.proxies.get("all")
        if not proxy_url or is_loopback(host) or proxy_bypass_environment(host, self.proxies):
            route = None
        else:
            route = Proxy.parse(proxy_url)
        self.routes[key] = route
        return route

    def tls_context(self) -> ssl.SSLContext:
        """Built at the first HTTPS request: loading a CA bundle costs milliseconds."""
        if self._tls is None:
            bundle = self.ca_bundle
            if bundle and os.path.isdir(bundle):
                context = ssl.create_default_context(capath=bundle)
            else:
                context = ssl.create_default_context(cafile=bundle)
            self._tls = context
        return self._tls

    # -- requests ------------------------------------------------------------------------------

    def request(self, method: str, url: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None, connect_timeout: float = 3.05,
                read_timeout: float = 10.0) -> Response:
        """Send one request, follow redirects, and read the whole answer.

        Raises:
            TransportTimeout: connecting or reading took longer than its timeout.
            TransportError: no answer (refused, reset, TLS, proxy, redirects, a malformed URL).
        """
        for _ in range(MAX_REDIRECTS + 1):
            status, data, location = self._exchange(method, Target.parse(url), body, headers,
                                                    connect_timeout, read_timeout)
            if status not in REDIRECTS or not location:
                return Response(status, data)
            url = urljoin(url, location)
            # As browsers and requests do: 303 becomes a GET, and so does a POST sent to 301/302.
            if status == 303 or (status in (301, 302) and method == "POST"):
                method, body = "GET", None
        raise TransportError(f"too many redirects (more than {MAX_REDIRECTS})")

    def get(self, url: str, connect_timeout: float = 3.05, read_timeout: float = 10.0) -> Response:
        return self.request("GET", url, connect_timeout=connect_timeout, read_timeout=read_timeout)

    def post_json(self, url: str, payload: Any, connect_timeout: float = 3.05,
                  read_timeout: float = 60.0) -> Response:
        """POST ``payload`` as JSON (see :func:`encode_json`)."""
        return self.request("POST", url, encode_json(payload),
                            {"Content-Type": "application/json"}, connect_timeout, read_timeout)

    def close(self) -> None:
        """Close every idle connection."""
        with self.lock:
            pools, self.idle = self.idle, {}
        for pool in pools.values():
            for conn in pool:
                conn.close()

    # -- one exchange on one connection --------------------------------------------------------

    def _exchange(self, method: str, target: Target, body: bytes | None,
                  headers: Mapping[str, str] | None, connect_timeout: float,
                  read_timeout: float) -> tuple[int, bytes, str | None]:
        proxy = self._route(target.scheme, target.host)
        key = (target.scheme, target.host, target.port)
        send_headers = {"User-Agent": USER_AGENT}
        if headers:
            send_headers.update(headers)
        line = target.path
        if proxy is not None and target.scheme == "http":
            line = target.url  # absolute form: the proxy connects to the host for us
            if proxy.authorization:
                send_headers["Proxy-Authorization"] = proxy.authorization
        conn = self._checkout(key)
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connect(target, proxy, connect_timeout)
            try:
                conn.sock.settimeout(read_timeout)
                conn.request(method, line, body=body, headers=send_headers)
                answer = conn.getresponse()
                data = answer.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                if reused:  # the server closed it while it sat idle: once more on a new one
                    conn, reused = None, False
                    continue
                raise TransportError(f"{target.host}:{target.port} closed the connection: "
                                     f"{exc or type(exc).__name__}") from None
            except TimeoutError:
                conn.close()
                raise TransportTimeout(f"timed out: no answer from {target.host}:{target.port} "
                                       f"within {read_timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise TransportError(f"bad answer from {target.host}:{target.port}: "
                                     f"{exc or type(exc).__name__}") from None
            break
        if answer.will_close:
            conn.close()
        else:
            self._checkin(key, conn)
        data = _decoded(data, answer.getheader("Content-Encoding"), target)
        return answer.status, data, answer.getheader("Location")

    def _connect(self, target: Target, proxy: Proxy | None,
                 timeout: float) -> http.client.HTTPConnection:
        host, port = (proxy.host, proxy.port) if proxy else (target.host, target.port)
        conn: http.client.HTTPConnection
        if target.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                               context=self.tls_context())
            if proxy is not None:
                tunnel_headers = {"Proxy-Authorization": proxy.authorization} if proxy.authorization else None
                conn.set_tunnel(target.host, target.port, headers=tunnel_headers)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.connect()
        except ssl.SSLError as exc:
            conn.close()
            raise TransportError(f"TLS with {target.host}:{target.port} failed: {exc}") from None
        except (TimeoutError, OSError) as exc:
            conn.close()
            if isinstance(exc, OSError) and str(exc).startswith("Tunnel connection failed"):
                raise TransportError(f"proxy error: {proxy.host}:{proxy.port} refused to "
                                     f"tunnel to {target.host}:{target.port}: {exc}") from None
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            error = TransportTimeout if isinstance(exc, TimeoutError) else TransportError
            message = f"cannot connect to {host}:{port}: {reason}"
            raise error(f"proxy error: {message}" if proxy else message) from None
        return conn

    def _checkout(self, key: tuple[str, str, int]) -> http.client.HTTPConnection | None:
        with self.lock:
            pool = self.idle.get(key)
            return pool.pop() if pool else None

    def _checkin(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self.lock:
            pool = self.idle.setdefault(key, [])
            if len(pool) < self.pool_size:
                pool.append(conn)
                return
        conn.close()  # more connections than the pool keeps: this one is not needed


def _decoded(data: bytes, encoding: str | None, target: Target) -> bytes:
    """The body without its Content-Encoding, for gzip and deflate."""
    if not encoding or not data:
        return data
    encoding = encoding.strip().lower()
    try:
        if encoding in ("gzip", "x-gzip"):
            return zlib.decompress(data, zlib.MAX_WBITS | 16)
        if encoding == "deflate":
            try:
                return zlib.decompress(data)
            except zlib.error:  # raw deflate, as some servers send it
                return zlib.decompress(data, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise TransportError(f"bad {encoding} body from {target.host}:{target.port}: {exc}") from None
    return data  # identity or an encoding we cannot decode: as sent


"""HTTP for the handler, through requests: one session per app, so connections to the tile
endpoint and the model server are pooled and kept alive across warm invocations.

requests does what an HTTP client must (redirects, gzip and chunked bodies, proxies and CONNECT
tunnels, TLS verification, NO_PROXY with CIDR ranges); this module only decides, once at cold
start and from the environment the app is built with (not the process's, which ``cnsq run``
does not own), which proxy and which CA bundle apply. Retries are the handler's own
(``DownloadAndPredict._with_retries``): bounded, with backoff, on 429 and 5xx.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy, should_bypass_proxies
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .compat import keep_body, watched_pool
from .errors import HttpDeadline, HttpError, HttpRefused, HttpTimeout, HttpTooLarge


def proxies_from_env(env: Mapping[str, str]) -> dict[str, str]:
    """``{"http": url, "https": url, "all": url, "no": "host,…"}`` from ``*_PROXY`` variables.

    As in urllib and requests, a lower-case variable wins over its upper-case twin; a proxy
    without a scheme (``proxy:3128``) is an ``http://`` proxy.
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


def ca_bundle_from_env(env: Mapping[str, str]) -> str | bool:
    """What requests verifies TLS with: ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` (a file or a
    folder), else True (certifi's bundle, requests' default)."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if env.get(name):
            return env[name]
    return True


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address: never sent to a proxy, which cannot reach this
    machine's loopback (``cnsq run``'s model server, a local tile server)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# Where no imagery lives and credentials do: link-local addresses (the EC2 and ECS metadata
# services at 169.254.169.254 and 169.254.170.2) and the metadata service's IPv6 address.
METADATA_NETWORKS = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"),
                     ipaddress.ip_network("fd00:ec2::254/128"))


def metadata_address(host: str) -> str | None:
    """The link-local or metadata address ``host`` is or resolves to, or None. A name that does
    not resolve is None here: the request fails on its own."""
    try:
        addresses = [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        try:
            addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0])
                         for info in socket.getaddrinfo(host, None)]
        except (OSError, UnicodeError, ValueError):
            return None
    for address in addresses:
        if any(address in network for network in METADATA_NETWORKS):
            return str(address)
    return None


def _refuse_metadata_redirects(response: requests.Response, **_: Any) -> None:
    """A response hook: a redirect towards a link-local or metadata address is refused before
    it is followed (an imagery server must not make the Lambda or `cnsq view` read
    credentials)."""
    if not response.is_redirect:
        return
    target = urljoin(response.url, response.headers.get("location", ""))
    found = metadata_address(urlsplit(target).hostname or "")
    if found:
        response.close()
        raise HttpRefused(f"{urlsplit(response.url).netloc}: a redirect to {found} "
                          "(link-local or instance metadata) was refused")


class DeadlineWatch:
    """Ends requests that outlive their deadline by shutting their connection's socket down.

    A timeout bounds each read of a socket, not a whole request: a server that sends a byte a
    second never trips it, and the thread reading keeps reading long after the caller gave up,
    holding a download worker into later invocations. Here one thread keeps every request's
    deadline; when one passes, the socket is shut down, the blocked read returns at once, the
    request fails, and its connection is discarded rather than pooled.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Any]] = []
        self._cancelled: set[int] = set()
        self._fired: set[int] = set()
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, connection: Any) -> int:
        """Shut ``connection``'s socket down at ``deadline`` (time.monotonic()); returns a
        ticket for :meth:`done`."""
        with self._wake:
            ticket = next(self._ids)
            heapq.heappush(self._heap, (deadline, ticket, connection))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-deadlines",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()
            return ticket

    def done(self, ticket: int) -> bool:
        """Forget a request that ended; whether its deadline had fired."""
        with self._wake:
            fired = ticket in self._fired
            self._fired.discard(ticket)
            if not fired:
                self._cancelled.add(ticket)
            return fired

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(None if not self._heap else self._heap[0][0] - time.monotonic())
                _, ticket, connection = heapq.heappop(self._heap)
                if ticket in self._cancelled:
                    self._cancelled.discard(ticket)
                    continue
                self._fired.add(ticket)
            # The socket the connection opened, even once it handed it to the response: with
            # `Connection: close` (HTTP/1.0, Python's http.server) http.client sets the
            # connection's ``sock`` to None and the response reads on alone.
            sock = getattr(connection, "opened_socket", None) or getattr(connection, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed
                    pass


def _remembering(connection_class: type) -> type:
    """A urllib3 connection class that keeps the socket it opened as ``opened_socket``: the
    deadline can shut it down whoever reads from it."""

    class Remembering(connection_class):  # type: ignore[misc, valid-type]
        opened_socket: Any = None

        def connect(self) -> None:
            super().connect()
            self.opened_socket = self.sock

    # Its messages name the connection as urllib3's do ("HTTPConnection(host=…, port=…)").
    Remembering.__name__ = Remembering.__qualname__ = connection_class.__name__
    return Remembering


def _watched(pool_class: type[HTTPConnectionPool], on_connection: Any) -> type:
    """A urllib3 pool class that reports each connection it hands out, in the requesting thread
    (where the request's deadline is known)."""
    return watched_pool(pool_class, _remembering(pool_class.ConnectionCls), on_connection)


class _Adapter(HTTPAdapter):
    """requests' adapter whose pools (direct and through a proxy) report their connections."""

    def __init__(self, on_connection: Any, **kwargs: Any):
        self._pools = {"http": _watched(HTTPConnectionPool, on_connection),
                       "https": _watched(HTTPSConnectionPool, on_connection)}
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pools

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = self._pools
        return manager


class Http:
    """A requests session with the proxy and CA settings of the app's environment, whose
    requests can have a total deadline (:class:`DeadlineWatch`)."""

    def __init__(self, pool_size: int, proxies: Mapping[str, str] | None = None,
                 verify: str | bool = True):
        self.session = requests.Session()
        self.session.trust_env = False  # the app's environment decides, not the process's
        self.session.hooks["response"].append(_refuse_metadata_redirects)
        self.deadlines = DeadlineWatch()
        self._current = threading.local()  # the deadline of this thread's request, if any
        adapter = _Adapter(self._on_connection, pool_connections=8,
                           pool_maxsize=max(1, pool_size))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.proxies = {k: v for k, v in (proxies or {}).items() if k != "no"}
        self.no_proxy = (proxies or {}).get("no")
        self.verify = verify

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL a request to ``url`` goes through, or None for a direct connection."""
        host = urlsplit(url).hostname or ""
        if not self.proxies or is_loopback(host):
            return None
        if self.no_proxy and should_bypass_proxies(url, no_proxy=self.no_proxy):
            return None
        return select_proxy(url, self.proxies)

    def _on_connection(self, connection: Any) -> None:
        deadline = getattr(self._current, "deadline", None)
        if deadline is not None:
            self._current.tickets.append(self.deadlines.watch(deadline, connection))

    def request(self, method: str, url: str, connect_timeout: float = 3.05,
                read_timeout: float = 10.0, deadline: float | None = None,
                max_bytes: int | None = None, **kwargs: Any) -> requests.Response:
        """One request, its body read whole; raises HttpTimeout or HttpError when no HTTP
        answer came back, HttpDeadline when ``deadline`` (time.monotonic()) passed first (the
        connection is closed then, so nothing keeps reading), and HttpTooLarge when the body is
        over ``max_bytes``: it is read in chunks and dropped at the limit, never held whole."""
        if max_bytes is not None:
            kwargs["stream"] = True
        proxy = self.proxy_for(url)
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise HttpDeadline(f"{urlsplit(url).netloc}: no time left")
            connect_timeout, read_timeout = min(connect_timeout, left), min(read_timeout, left)
        self._current.deadline, self._current.tickets = deadline, []
        try:
            response = self.session.request(
                method, url, timeout=(connect_timeout, read_timeout), verify=self.verify,
                proxies={"http": proxy, "https": proxy} if proxy else {}, **kwargs)
            if max_bytes is not None:
                _read_at_most(response, max_bytes, urlsplit(url).netloc)
            return response
        except (HttpTooLarge, HttpRefused):
            raise
        except requests.Timeout as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise HttpDeadline(f"{urlsplit(url).netloc}: not answered by its deadline") from None
            raise HttpTimeout(f"{urlsplit(url).netloc}: timed out ({type(exc).__name__})") from None
        except (requests.RequestException, ValueError) as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise HttpDeadline(f"{urlsplit(url).netloc}: not answered by its deadline") from None
            raise HttpError(_reason(exc)) from None
        finally:
            fired = [self.deadlines.done(t) for t in self._current.tickets]
            self._current.deadline, self._current.tickets = None, []
            if any(fired) and deadline is not None:
                # A body cut short can still look whole to requests (no Content-Length).
                raise HttpDeadline(f"{urlsplit(url).netloc}: not answered by its deadline")

    def get(self, url: str, connect_timeout: float = 3.05, read_timeout: float = 10.0,
            deadline: float | None = None, max_bytes: int | None = None) -> requests.Response:
        return self.request("GET", url, connect_timeout, read_timeout, deadline, max_bytes)

    def post_json(self, url: str, payload: Any, connect_timeout: float = 3.05,
                  read_timeout: float = 60.0, deadline: float | None = None,
                  max_bytes: int | None = None) -> requests.Response:
        return self.request("POST", url, connect_timeout, read_timeout, deadline, max_bytes,
                            json=payload)

    def close(self) -> None:
        self.session.close()


def _read_at_most(response: requests.Response, limit: int, where: str) -> None:
    """Read a streamed body into ``response.content``, refusing it past ``limit`` bytes (a
    Content-Length over it is refused before a byte is read). The connection of a refused body
    is closed, not pooled: the rest of the body is never read."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        response.close()
        raise HttpTooLarge(f"{where}: the body is {int(declared):,} bytes, over the "
                           f"{limit:,} allowed")
    chunks, size = [], 0
    for chunk in response.iter_content(65536):
        size += len(chunk)
        if size > limit:
            response.close()
            raise HttpTooLarge(f"{where}: the body is over the {limit:,} bytes allowed")
        chunks.append(chunk)
    keep_body(response, b"".join(chunks))


def _reason(exc: BaseException) -> str:
    """requests' message, without the urllib3 wrapping around its cause."""
    text = str(exc)
    cause: Any = exc.__context__ or exc.__cause__
    while cause is not None and getattr(cause, "reason", None) is not None:
        cause = cause.reason  # MaxRetryError → NewConnectionError / SSLError …
    if cause is not None and not isinstance(cause, str) and str(cause):
        return f"{type(exc).__name__}: {cause}"
    return f"{type(exc).__name__}: {text}"

"""HTTP for the handler, through requests: one session per app, so connections to the tile
endpoint and the model server are pooled and kept alive across warm invocations.

requests does what an HTTP client must (redirects, gzip and chunked bodies, proxies and CONNECT
tunnels, TLS verification, NO_PROXY with CIDR ranges); this module only decides, once at cold
start and from the environment the app is built with (not the process's, which ``cnsq run``
does not own), which proxy and which CA bundle apply. Retries are the handler's own
(``DownloadAndPredict._with_retries``): bounded, with backoff, on 429 and 5xx.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.utils import select_proxy, should_bypass_proxies

from .errors import HttpError, HttpTimeout


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


class Http:
    """A requests session with the proxy and CA settings of the app's environment."""

    def __init__(self, pool_size: int, proxies: Mapping[str, str] | None = None,
                 verify: str | bool = True):
        self.session = requests.Session()
        self.session.trust_env = False  # the app's environment decides, not the process's
        adapter = HTTPAdapter(pool_connections=8, pool_maxsize=max(1, pool_size))
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

    def request(self, method: str, url: str, connect_timeout: float = 3.05,
                read_timeout: float = 10.0, **kwargs: Any) -> requests.Response:
        """One request; raises HttpTimeout or HttpError when no HTTP answer came back."""
        proxy = self.proxy_for(url)
        try:
            return self.session.request(
                method, url, timeout=(connect_timeout, read_timeout), verify=self.verify,
                proxies={"http": proxy, "https": proxy} if proxy else {}, **kwargs)
        except requests.Timeout as exc:
            raise HttpTimeout(f"{urlsplit(url).netloc}: timed out ({type(exc).__name__})") from None
        except (requests.RequestException, ValueError) as exc:
            raise HttpError(_reason(exc)) from None

    def get(self, url: str, connect_timeout: float = 3.05, read_timeout: float = 10.0
            ) -> requests.Response:
        return self.request("GET", url, connect_timeout, read_timeout)

    def post_json(self, url: str, payload: Any, connect_timeout: float = 3.05,
                  read_timeout: float = 60.0) -> requests.Response:
        return self.request("POST", url, connect_timeout, read_timeout, json=payload)

    def close(self) -> None:
        self.session.close()


def _reason(exc: BaseException) -> str:
    """requests' message, without the urllib3 wrapping around its cause."""
    text = str(exc)
    cause = exc.__context__ or exc.__cause__
    while cause is not None and getattr(cause, "reason", None) is not None:
        cause = cause.reason  # MaxRetryError → NewConnectionError / SSLError …
    if cause is not None and not isinstance(cause, str) and str(cause):
        return f"{type(exc).__name__}: {cause}"
    return f"{type(exc).__name__}: {text}"

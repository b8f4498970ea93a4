"""boto3 sessions and clients — the only module that builds them.

Clients take ``--profile``/``--region``, the standard AWS environment, and ``AWS_ENDPOINT_URL``
(read by boto3 itself), so every command runs unchanged against moto server or LocalStack. They
use botocore's adaptive retry mode: large deploys and event polling survive throttling.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import boto3
import botocore.client
import botocore.config
import botocore.exceptions
import botocore.session

from cnsq import __version__
from cnsq.errors import AwsError, AwsUnreachable, option

# What every function that calls AWS takes: a botocore client (of any service).
Client: TypeAlias = botocore.client.BaseClient

RETRIES = botocore.config.Config(
    retries={"mode": "adaptive", "max_attempts": 10},
    user_agent_extra=f"cnsq/{__version__}",
)


# One botocore data loader for the process. A boto3 session otherwise parses each service's
# model again (EC2's is megabytes of JSON) for its first client, and the endpoints with it: a
# command that makes several sessions, or a process that runs many commands (tests, `cnsq view`)
# paid that every time. The loader caches what it parsed; the models are read-only data.
_loader: Any = None
_loader_lock = threading.Lock()


def _botocore_session() -> botocore.session.Session:
    """A new botocore session that uses the process's shared data loader."""
    global _loader
    session = botocore.session.get_session()
    with _loader_lock:
        if _loader is None:
            _loader = session.get_component("data_loader")
        else:
            session.register_component("data_loader", _loader)
    return session


def _dedupe_search_paths() -> None:
    """boto3 adds its own data folder to the loader's search paths for every session made on
    it: keep each folder once."""
    with _loader_lock:
        if _loader is not None:
            _loader.search_paths[:] = list(dict.fromkeys(_loader.search_paths))


@dataclass
class Aws:
    """A boto3 session and the clients made from it (cached per service)."""

    profile: str | None = None
    region: str | None = None
    _session: Any = field(default=None, init=False, repr=False)
    _clients: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    # Creating a boto3 client is not thread-safe; preflight's checks ask for theirs in parallel.
    _lock: Any = field(default_factory=threading.Lock, init=False, repr=False)
    _reached: bool = field(default=False, init=False, repr=False)

    def _reach(self) -> None:
        """One quick call before the first client: with no network, the clients' adaptive
        retries (ten attempts, backing off up to 20 s each) took a minute or more to fail.

        Raises:
            AwsError: AWS (or AWS_ENDPOINT_URL) did not answer within seconds.
        """
        try:
            sts = self.session.client("sts", config=botocore.config.Config(
                connect_timeout=5, read_timeout=10,
                retries={"mode": "standard", "total_max_attempts": 2}))
            sts.get_caller_identity()
        except (botocore.exceptions.ConnectionError,  # refused, timed out, a dead proxy
                botocore.exceptions.ReadTimeoutError) as exc:
            raise AwsUnreachable(f"cannot reach AWS ({exc}): check your network, a proxy, or "
                                 "AWS_ENDPOINT_URL", str(exc)) from None
        except Exception:  # noqa: BLE001 - no region, no credentials, denied, an endpoint that
            pass  # speaks another service only: the command's own call says what is wrong
        self._reached = True

    @property
    def session(self) -> boto3.Session:
        if self._session is None:
            try:
                core = _botocore_session()
                session = boto3.Session(botocore_session=core, profile_name=self.profile,
                                        region_name=self.region)
                _dedupe_search_paths()
                core.get_scoped_config()  # a missing profile fails here, as before
                self._session = session
            except botocore.exceptions.ProfileNotFound:
                raise AwsError(
                    f"AWS profile '{self.profile}' is not in your AWS config "
                    "(list them with `aws configure list-profiles`)"
                ) from None
        return self._session

    def client(self, service: str, **config: Any) -> Client:
        """A client with adaptive retries; ``config`` adds botocore Config options
        (e.g. ``max_pool_connections`` for many calls in flight)."""
        key = service + repr(sorted(config.items()))
        with self._lock:
            if not self._reached:
                self._reach()
            if key not in self._clients:
                try:
                    merged = RETRIES.merge(botocore.config.Config(**config)) if config else RETRIES
                    self._clients[key] = self.session.client(service, config=merged)
                except botocore.exceptions.NoRegionError:
                    raise AwsError(
                        f"no AWS region: pass {option('region')}, set AWS_REGION, or write region in "
                        "config.yml (or a region in your profile)") from None
            return self._clients[key]

    @property
    def region_name(self) -> str:
        return self.session.region_name or "us-east-1"


def pages(client: Client, operation: str, **params: Any) -> Iterator[dict[str, Any]]:
    """The pages of ``operation``'s answer, each fetched when it is read (stop early to fetch no
    more).

    Every call cnsq makes to an operation botocore can paginate goes through here or through
    ``get_paginator`` (tests/unit/test_pagination.py fails on a direct call): AWS answers in pages
    (RDS 100 rows by default, EC2 up to 1,000, CloudFormation 100 events), and reading the first
    alone gives a wrong answer that looks right.
    """
    return iter(client.get_paginator(operation).paginate(**params))


def collect(client: Client, operation: str, key: str, **params: Any) -> list[Any]:
    """The items under ``key`` on every page of ``operation``'s answer."""
    return [item for page in pages(client, operation, **params) for item in page.get(key, [])]


def explain(exc: BaseException) -> str | None:
    """One line that says what went wrong with AWS and how to fix it, or None if not AWS's."""
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return (
            "no AWS credentials found: run `aws configure` or `aws sso login`, set AWS_PROFILE, "
            "or pass --profile"
        )
    if isinstance(exc, botocore.exceptions.NoRegionError):
        return "no AWS region: pass --region or set AWS_REGION"
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return f"cannot reach AWS at {exc.kwargs.get('endpoint_url')}: check your network"
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        message = error.get("Message", "")
        operation = getattr(exc, "operation_name", "the request")
        if code in ("ExpiredToken", "ExpiredTokenException", "RequestExpired"):
            return "your AWS session has expired: refresh your credentials (e.g. `aws sso login`)"
        if code in ("InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch"):
            return f"AWS did not accept your credentials ({code}): check the access key and profile"
        if code.startswith("AccessDenied") or code in ("UnauthorizedOperation", "AuthFailure"):
            return f"access denied for {operation}: {message} (your IAM identity needs this permission)"
        if code in ("Throttling", "ThrottlingException", "TooManyRequestsException"):
            return f"AWS throttled {operation} even after retries: try again in a minute"
        return f"{operation} failed: {code}: {message}"
    return None

"""What the handler reads from its environment, checked at cold start."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .cog import Imagery
from .errors import SettingsError
from .http import ca_bundle_from_env, proxies_from_env
from .tiles import check_tile_endpoint

# The largest tile body read (MAX_TILE_BYTES), by the worker and by `cnsq view`'s imagery.
DEFAULT_MAX_TILE_BYTES = 8 * 2**20


@dataclass
class Settings:
    """Everything the handler reads from its environment."""

    tile_endpoint: str
    prediction_endpoint: str
    database_url: str | None = None
    database_secret_arn: str | None = None
    # On AWS: the instance whose RDS-managed secret holds the credentials, and where it is.
    database_instance: str | None = None
    database_host: str | None = None
    database_port: int = 5432
    database_name: str = "ResultsDB"
    database_sslmode: str = "require"
    database_sslrootcert: str | None = None  # a CA bundle: the connection becomes verify-full
    tile_token: str | None = None
    missing_tiles: str = "skip"  # skip: logged and counted, not retried; fail: retried
    max_instances: int = 64
    tile_timeout: float = 10.0
    # Total time for an invocation's downloads, retries included: a server that trickles a byte
    # at a time defeats the per-read timeout. None: tile_timeout x retries + backoff.
    tile_deadline: float | None = None
    predict_timeout: float = 60.0
    # Time kept back from the Lambda's remaining time for the prediction and the write.
    reserve: float = 5.0
    # PostgreSQL: statement_timeout and lock_timeout (s); a black-holed connection fails after
    # tcp_user_timeout instead of blocking the invocation.
    database_timeout: float = 30.0
    retries: int = 3
    backoff: float = 0.2
    # The largest body read: a tile (MAX_TILE_BYTES) and the model's answer to one request
    # (MAX_PREDICTION_BYTES). A larger one fails its own records, never the invocation's memory.
    max_tile_bytes: int = DEFAULT_MAX_TILE_BYTES
    max_prediction_bytes: int = 64 * 2**20
    download_workers: int = 16
    proxies: dict[str, str] = field(default_factory=dict)  # from *_PROXY: see http.py
    ca_bundle: str | bool = True  # REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE; True: certifi's
    # The stack's namespace (METRICS_NAMESPACE): each invocation's record counts are written as
    # an embedded-metric log line for the controller. None: no such line.
    metrics_namespace: str | None = None
    function_name: str = ""  # AWS_LAMBDA_FUNCTION_NAME, set by Lambda
    # COG or STAC imagery read by the worker itself (IMAGERY, JSON): replaces the XYZ endpoint.
    imagery: Imagery | None = None

    REQUIRED = ("PREDICTION_ENDPOINT",)

    @classmethod
    def from_env(cls, env: dict[str, str]) -> Settings:
        """Raises ValueError naming every missing or malformed variable."""
        missing = [name for name in cls.REQUIRED if not env.get(name)]
        if not env.get("TILE_ENDPOINT") and not env.get("IMAGERY"):
            missing.insert(0, "TILE_ENDPOINT (or IMAGERY)")
        if not any(env.get(k) for k in ("DATABASE_URL", "DATABASE_INSTANCE", "DATABASE_SECRET_ARN")):
            missing.append("DATABASE_URL or DATABASE_INSTANCE")
        if missing:
            raise SettingsError(f"missing environment variable(s): {', '.join(missing)}")
        imagery = Imagery.from_json(env["IMAGERY"]) if env.get("IMAGERY") else None
        if imagery is None:
            check_tile_endpoint(env["TILE_ENDPOINT"])
        mode = env.get("MISSING_TILES", "skip")
        if mode not in ("skip", "fail"):
            raise SettingsError(f"MISSING_TILES must be 'skip' or 'fail', got {mode!r}")
        try:
            return cls(
                tile_endpoint=env.get("TILE_ENDPOINT", ""),
                imagery=imagery,
                prediction_endpoint=env["PREDICTION_ENDPOINT"],
                **database_fields(env),
                tile_token=env.get("TILE_ACCESS_TOKEN") or None,
                missing_tiles=mode,
                max_instances=int(env.get("MAX_INSTANCES", 64)),
                tile_timeout=float(env.get("TILE_TIMEOUT", 10)),
                tile_deadline=float(env["TILE_DEADLINE"]) if env.get("TILE_DEADLINE") else None,
                reserve=float(env.get("DEADLINE_RESERVE", 5)),
                database_timeout=float(env.get("DATABASE_TIMEOUT", 30)),
                predict_timeout=float(env.get("PREDICT_TIMEOUT", 60)),
                retries=int(env.get("RETRIES", 3)),
                backoff=float(env.get("RETRY_BACKOFF", 0.2)),
                max_tile_bytes=int(env.get("MAX_TILE_BYTES", DEFAULT_MAX_TILE_BYTES)),
                max_prediction_bytes=int(env.get("MAX_PREDICTION_BYTES", 64 * 2**20)),
                download_workers=int(env.get("DOWNLOAD_WORKERS", 16)),
                proxies=proxies_from_env(env),
                ca_bundle=ca_bundle_from_env(env),
                metrics_namespace=env.get("METRICS_NAMESPACE") or None,
                function_name=env.get("AWS_LAMBDA_FUNCTION_NAME", ""),
            )
        except ValueError as exc:
            raise SettingsError(f"malformed numeric environment variable: {exc}") from None


def database_fields(env: dict[str, str]) -> dict[str, Any]:
    """The :class:`Settings` fields that say where the results database is and how to log in.

    Raises:
        ValueError: DATABASE_PORT is not a number.
    """
    return {
        "database_url": env.get("DATABASE_URL") or None,
        "database_secret_arn": env.get("DATABASE_SECRET_ARN") or None,
        "database_instance": env.get("DATABASE_INSTANCE") or None,
        "database_host": env.get("DATABASE_HOST") or None,
        "database_port": int(env.get("DATABASE_PORT") or 5432),
        "database_name": env.get("DATABASE_NAME") or "ResultsDB",
        "database_sslmode": env.get("DATABASE_SSLMODE") or (
            "verify-full" if env.get("DATABASE_SSLROOTCERT") else "require"),
        "database_sslrootcert": env.get("DATABASE_SSLROOTCERT") or None,
    }

"""What a run costs: prices (read from the AWS Price List API, or the dated file shipped in the
package) and a usage (host hours, Lambda GB-seconds …) make a bill, item by item.

One home for the arithmetic: ``cnsq estimate``, ``cnsq status`` and the simulation
(:mod:`simulation`) all call :func:`bill`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from cnsq.egress import EGRESS_NAT
from cnsq.errors import CnsqError, option

SHIPPED_REGION = "us-east-1"


@dataclass(frozen=True)
class Prices:
    """USD prices; ``source`` says where they came from (the API, or the shipped file and its date)."""

    region: str
    source: str
    instance_hour: dict[str, float]
    database_hour: dict[str, float]
    lambda_gb_second: float
    lambda_request: float
    # Arm (Graviton) functions have prices of their own: the Price List's "-ARM" usage types.
    lambda_gb_second_arm: float
    lambda_request_arm: float
    sqs_request: float
    nat_hour: float
    nat_gb: float
    load_balancer_hour: float
    load_balancer_lcu_hour: float
    # The stack's smaller standing parts, each prorated by the hour as AWS bills them.
    public_ipv4_hour: float  # the NAT gateway's address (VPC pricing: every public IPv4)
    database_storage_gb_month: float  # RDS gp3
    secret_month: float  # Secrets Manager, per secret
    custom_metric_month: float  # CloudWatch, per metric (the first tier)
    metric_requested: float  # CloudWatch GetMetricData, per metric asked for
    # Spot: an expectation, not a list price (it moves with supply and demand); the account's
    # recent DescribeSpotPriceHistory when it can be read, else the shipped dated figures.
    spot_hour: dict[str, float] = field(default_factory=dict)
    spot_source: str = ""
    date: str = ""

    def instance(self, instance_type: str) -> float:
        return _look_up(self.instance_hour, instance_type, f"No price for {instance_type} in "
                        f"{self.source}: run `cnsq estimate` with AWS credentials "
                        f"(pricing:GetProducts) or pass {option('instance_price')}")

    def spot(self, instance_type: str) -> float:
        return _look_up(self.spot_hour, instance_type, f"No Spot price for {instance_type} in "
                        f"{self.spot_source or self.source}: run with AWS credentials "
                        "(ec2:DescribeSpotPriceHistory)")

    def database(self, instance_class: str) -> float:
        return _look_up(self.database_hour, instance_class, f"No price for {instance_class} in "
                        f"{self.source}: run `cnsq estimate` with AWS credentials "
                        f"(pricing:GetProducts) or pass {option('database_price')}")


def _look_up(table: dict[str, float], key: str, missing: str) -> float:
    """``table[key]``; :class:`CnsqError` saying ``missing`` when it has none."""
    if key not in table:
        raise CnsqError(missing)
    return table[key]


def shipped_prices() -> Prices:
    """The dated prices shipped in the package (us-east-1 list prices)."""
    text = resources.files("cnsq").joinpath(f"data/prices-{SHIPPED_REGION}.json").read_text()
    raw: dict[str, Any] = json.loads(text)
    date = raw.pop("date")
    raw.pop("source")
    spot_date = raw.pop("spot_date")
    return Prices(source=f"the prices shipped with cnsq ({SHIPPED_REGION}, {date})", date=date,
                  spot_source=f"the Spot prices shipped with cnsq ({SHIPPED_REGION}, "
                              f"{spot_date}, an expectation)", **raw)


# AWS prorates a monthly price by the hour over a 730-hour month (RDS storage, Secrets Manager,
# CloudWatch metrics).
MONTH_SECONDS = 730 * 3600.0


@dataclass(frozen=True)
class Parts:
    """What the stack keeps besides its hosts and functions, from its config
    (:func:`cnsq.ops.estimate.parts`): what a run's usage adds beyond the work itself.

    ``egress``: the imagery's path: through the NAT gateway (billed per GB), the egress-only
    internet gateway (IPv6) or the S3 gateway endpoint (neither billed per GB).
    ``host_metrics``: custom metrics each GPU host's agent publishes (3 GPU measurements, by
    themselves and by instance); ``stack_metrics``: those published while any host or call runs
    (the 3 by group, the handler's 2 record counts); ``controller_metrics``: the metrics the
    controller asks GetMetricData for each minute (0: the stack does not scale itself).
    """

    egress: str = EGRESS_NAT
    public_ipv4: int = 1
    storage_gb: float = 20.0
    secrets: int = 2
    host_metrics: int = 6
    stack_metrics: int = 5
    controller_metrics: int = 10


@dataclass
class Usage:
    """What a run used. Seconds for the things billed by the hour."""

    instance_seconds: float = 0.0  # on demand
    spot_instance_seconds: float = 0.0
    lambda_gb_seconds: float = 0.0
    lambda_requests: float = 0.0
    sqs_requests: float = 0.0
    nat_seconds: float = 0.0
    nat_gb: float = 0.0
    database_seconds: float = 0.0
    load_balancer_seconds: float = 0.0
    load_balancer_lcu_hours: float = 0.0
    public_ipv4_seconds: float = 0.0
    storage_gb_seconds: float = 0.0
    secret_seconds: float = 0.0
    metric_seconds: float = 0.0
    metrics_requested: float = 0.0


def run_usage(seconds: float, instance_seconds: float, lambda_gb_seconds: float, calls: float,
              sqs_requests: float, downloaded_gb: float, parts: Parts = Parts(),
              spot_instance_seconds: float = 0.0) -> Usage:
    """A run's usage over ``seconds`` of the stack standing: the NAT gateway, its address, the
    database and its storage, the secrets and the load balancer for that long; the images
    through the NAT once (``downloaded_gb``) unless ``parts.egress`` is a path without a per-GB
    charge, and through the load balancer base64-encoded (4/3 of it; 1 LCU processes 1 GB an
    hour, at least one LCU-hour an hour); the custom metrics while hosts and the stack publish
    them; the controller's GetMetricData each minute. The one place estimate, status and the
    simulation turn a run into a usage."""
    return Usage(
        instance_seconds=instance_seconds, spot_instance_seconds=spot_instance_seconds,
        lambda_gb_seconds=lambda_gb_seconds,
        lambda_requests=calls, sqs_requests=sqs_requests, nat_seconds=seconds,
        nat_gb=downloaded_gb if parts.egress == EGRESS_NAT else 0.0,
        database_seconds=seconds, load_balancer_seconds=seconds,
        load_balancer_lcu_hours=max(seconds / 3600, downloaded_gb * 4 / 3),
        public_ipv4_seconds=parts.public_ipv4 * seconds,
        storage_gb_seconds=parts.storage_gb * seconds, secret_seconds=parts.secrets * seconds,
        metric_seconds=parts.host_metrics * (instance_seconds + spot_instance_seconds)
        + parts.stack_metrics * seconds,
        metrics_requested=parts.controller_metrics * seconds / 60)


@dataclass(frozen=True)
class Item:
    name: str
    quantity: float
    unit: str
    price: float
    cost: float


@dataclass
class Bill:
    items: list[Item] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(item.cost for item in self.items)

    def per_million(self, tiles: int) -> float:
        return self.total / tiles * 1_000_000 if tiles else 0.0

    def rows(self) -> list[list[str]]:
        return [[i.name, f"{i.quantity:,.2f} {i.unit}", f"${i.price:g}", f"${i.cost:,.2f}"]
                for i in self.items]


def bill(usage: Usage, prices: Prices, instance_type: str, database_class: str | None,
         architecture: str = "x86_64") -> Bill:
    """The items of a run, each quantity × its price. ``database_class`` None: no database
    (an adopted or external one is not the stack's to bill); ``architecture``: the worker
    Lambda's (``lambdas.<Name>.architecture``), x86_64 or arm64, each at its own price."""
    hour = 3600.0
    arm = architecture == "arm64"
    what = " (arm64)" if arm else ""
    items = []
    if usage.instance_seconds or not usage.spot_instance_seconds:
        items.append(Item(f"GPU hosts ({instance_type})", usage.instance_seconds / hour, "h",
                          prices.instance(instance_type), 0.0))
    if usage.spot_instance_seconds:
        items.append(Item(f"GPU hosts, Spot ({instance_type}, expected)",
                          usage.spot_instance_seconds / hour, "h", prices.spot(instance_type),
                          0.0))
    items += [
        Item(f"Lambda compute{what}", usage.lambda_gb_seconds, "GB-s",
             prices.lambda_gb_second_arm if arm else prices.lambda_gb_second, 0.0),
        Item(f"Lambda requests{what}", usage.lambda_requests, "requests",
             prices.lambda_request_arm if arm else prices.lambda_request, 0.0),
        Item("SQS requests", usage.sqs_requests, "requests", prices.sqs_request, 0.0),
        Item("NAT gateway hours", usage.nat_seconds / hour, "h", prices.nat_hour, 0.0),
        Item("NAT data processed", usage.nat_gb, "GB", prices.nat_gb, 0.0),
        Item("Load balancer hours", usage.load_balancer_seconds / hour, "h",
             prices.load_balancer_hour, 0.0),
        Item("Load balancer capacity", usage.load_balancer_lcu_hours, "LCU-h",
             prices.load_balancer_lcu_hour, 0.0),
    ]
    if database_class:
        items.append(Item(f"Database ({database_class})", usage.database_seconds / hour, "h",
                          prices.database(database_class), 0.0))
        items.append(Item("Database storage", usage.storage_gb_seconds / MONTH_SECONDS,
                          "GB-month", prices.database_storage_gb_month, 0.0))
    if usage.public_ipv4_seconds:  # none when the network (and its NAT) is the user's
        items.append(Item("Public IPv4 address (NAT)", usage.public_ipv4_seconds / hour, "h",
                          prices.public_ipv4_hour, 0.0))
    items += [
        Item("Secrets Manager secrets", usage.secret_seconds / MONTH_SECONDS, "secret-month",
             prices.secret_month, 0.0),
        Item("Custom metrics", usage.metric_seconds / MONTH_SECONDS, "metric-month",
             prices.custom_metric_month, 0.0),
        Item("Metrics read (GetMetricData)", usage.metrics_requested, "metrics",
             prices.metric_requested, 0.0),
    ]
    return Bill([Item(i.name, i.quantity, i.unit, i.price, i.quantity * i.price) for i in items])


# -- the AWS Price List API ------------------------------------------------------------------
# Each price: the service code, the filters (TERM_MATCH), and the usage type that picks the
# product among those the filters leave, after the region's prefix (USE1-, EU-; none in some of
# us-east-1's). Matched whole: "Request" is not Lambda@Edge's "Lambda-Edge-Request", nor Arm's
# "Request-ARM".
PRICE_QUERIES: dict[str, tuple[str, dict[str, str], str]] = {
    "lambda_gb_second": ("AWSLambda", {}, "Lambda-GB-Second"),
    "lambda_request": ("AWSLambda", {}, "Request"),
    "lambda_gb_second_arm": ("AWSLambda", {}, "Lambda-GB-Second-ARM"),
    "lambda_request_arm": ("AWSLambda", {}, "Request-ARM"),
    "sqs_request": ("AWSQueueService", {}, "Requests-Tier1"),
    "nat_hour": ("AmazonEC2", {"productFamily": "NAT Gateway"}, "NatGateway-Hours"),
    "nat_gb": ("AmazonEC2", {"productFamily": "NAT Gateway"}, "NatGateway-Bytes"),
    "load_balancer_hour": ("AWSELB", {"productFamily": "Load Balancer-Application"},
                           "LoadBalancerUsage"),
    "load_balancer_lcu_hour": ("AWSELB", {"productFamily": "Load Balancer-Application"},
                               "LCUUsage"),
}
# Smaller prices, each taken from the shipped file when the API has no product of that usage
# type (said in the source): a few cents of a run should not cost the whole look-up.
MINOR_PRICE_QUERIES: dict[str, tuple[str, dict[str, str], str]] = {
    "public_ipv4_hour": ("AmazonVPC", {}, "PublicIPv4:InUseAddress"),
    "database_storage_gb_month": ("AmazonRDS", {"productFamily": "Database Storage"},
                                  "RDS:GP3-Storage"),
    "secret_month": ("AWSSecretsManager", {}, "AWSSecretsManager-Secrets"),
    "custom_metric_month": ("AmazonCloudWatch", {}, "CW:MetricMonitorUsage"),
    "metric_requested": ("AmazonCloudWatch", {}, "CW:GMD-Metrics"),
}
INSTANCE_FILTERS = {"operatingSystem": "Linux", "tenancy": "Shared", "preInstalledSw": "NA",
                    "capacitystatus": "Used"}
DATABASE_FILTERS = {"databaseEngine": "PostgreSQL", "deploymentOption": "Single-AZ"}
# The Price List API answers in us-east-1 (and eu-central-1, ap-south-1) for every region.
PRICING_REGION = "us-east-1"


# What one price's query may read of the Price List API: its answers are a few pages; more, or
# a NextToken longer than any AWS writes, is an endpoint not to be trusted (it can grow a token
# on every page without end). The whole look-up has a total time too (prices_for).
MAX_PAGES = 20
MAX_TOKEN = 8192
PRICES_SECONDS = 60.0


def _usd(product: dict) -> float | None:
    """The first non-zero on-demand USD price of a product (tiers: the first that costs).

    Raises:
        CnsqError: a price that is not a finite, non-negative number (Infinity, NaN, text).
    """
    for offer in product.get("terms", {}).get("OnDemand", {}).values():
        dimensions = sorted(offer.get("priceDimensions", {}).values(),
                            key=lambda d: _number(d.get("beginRange", "0") or 0))
        for dimension in dimensions:
            price = _number(dimension.get("pricePerUnit", {}).get("USD", "0") or 0)
            if price > 0:
                return price
    return None


def _number(text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise CnsqError(f"the Price List API answered {str(text)[:40]!r} where a price belongs")
    return value


def _products(pricing: Any, service: str, filters: dict[str, str]) -> list[dict]:
    found = []
    pages = pricing.get_paginator("get_products").paginate(
        ServiceCode=service, FormatVersion="aws_v1",
        Filters=[{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in filters.items()])
    for number, page in enumerate(pages, 1):
        found += [json.loads(item) if isinstance(item, str) else item
                  for item in page.get("PriceList", [])]
        token = page.get("NextToken") or ""
        if token and (number >= MAX_PAGES or len(token) > MAX_TOKEN):
            raise CnsqError(f"the Price List API answered {service} in more than {number} pages "
                            "or with a NextToken no AWS answer has: not read further")
    return found


def _usage_type(usage: str) -> str:
    """A usage type without its region's prefix: ``USE1-Request`` → ``Request``. A prefix is
    capitals and digits before the first hyphen (``EU-``, ``APS1-``); there may be none
    (``NatGateway-Hours``, ``Lambda-Edge-Request`` are whole)."""
    prefix, _, rest = usage.partition("-")
    return rest if rest and prefix.isalnum() and prefix.isupper() else usage


def _pick(products: list[dict], usage_type: str | None) -> float | None:
    for product in products:
        usage = product.get("product", {}).get("attributes", {}).get("usagetype", "")
        if usage_type is None or usage == usage_type or _usage_type(usage) == usage_type:
            price = _usd(product)
            if price is not None:
                return price
    return None


def account_prices(pricing: Any, region: str, instance_type: str,
                   database_class: str | None) -> Prices:
    """This region's prices from the Price List API (``pricing:GetProducts``); raises
    :class:`CnsqError` naming the price it could not find."""
    where = {"regionCode": region}
    values: dict[str, Any] = {}
    for name, (service, filters, ending) in PRICE_QUERIES.items():
        price = _pick(_products(pricing, service, {**filters, **where}), ending)
        if price is None:
            raise CnsqError(f"the Price List API has no {name.replace('_', ' ')} for {region}")
        values[name] = price
    shipped, borrowed = shipped_prices(), []
    for name, (service, filters, ending) in MINOR_PRICE_QUERIES.items():
        price = _pick(_products(pricing, service, {**filters, **where}), ending)
        if price is None:
            price = getattr(shipped, name)
            borrowed.append(name.replace("_", " "))
        values[name] = price
    instance = _pick(_products(pricing, "AmazonEC2", {
        "instanceType": instance_type, **INSTANCE_FILTERS, **where}), None)
    if instance is None:
        raise CnsqError(f"the Price List API has no on-demand Linux price for {instance_type} "
                        f"in {region}")
    databases = {}
    if database_class:
        database = _pick(_products(pricing, "AmazonRDS", {
            "instanceType": database_class, **DATABASE_FILTERS, **where}), None)
        if database is None:
            raise CnsqError(f"the Price List API has no PostgreSQL price for {database_class} "
                            f"in {region}")
        databases[database_class] = database
    source = f"the AWS Price List API ({region})"
    if borrowed:
        source += f"; {', '.join(borrowed)} from the prices shipped with cnsq ({shipped.date})"
    return Prices(region=region, source=source, spot_hour=shipped.spot_hour,
                  spot_source=shipped.spot_source,
                  instance_hour={instance_type: instance}, database_hour=databases, **values)


def account_spot(ec2: Any, instance_type: str, now: float) -> float | None:
    """The expected Spot price of ``instance_type``: the mean over the region's zones of each
    zone's latest Linux price in the last day (ec2:DescribeSpotPriceHistory); None without any."""
    from datetime import UTC, datetime, timedelta

    start = datetime.fromtimestamp(now, UTC) - timedelta(days=1)
    latest: dict[str, tuple[Any, float]] = {}
    pages = ec2.get_paginator("describe_spot_price_history").paginate(
        InstanceTypes=[instance_type], ProductDescriptions=["Linux/UNIX"], StartTime=start)
    for number, page in enumerate(pages, 1):
        for entry in page.get("SpotPriceHistory", []):
            zone, when = entry.get("AvailabilityZone", ""), entry.get("Timestamp")
            price = _number(entry.get("SpotPrice", "nan"))
            if zone not in latest or (when and latest[zone][0] and when > latest[zone][0]):
                latest[zone] = (when, price)
        if number >= MAX_PAGES:
            break
    if not latest:
        return None
    return sum(price for _, price in latest.values()) / len(latest)


def with_given(prices: Prices, instance_type: str, instance_price: float | None,
               database_class: str | None, database_price: float | None
               ) -> tuple[Prices, list[str]]:
    """``prices`` with the hourly prices the user gave for the GPU hosts' instance type and the
    database's class (a type the Price List or the shipped prices lack, or a discount the
    account has), and a note for each price given."""
    notes = []
    if instance_price is not None:
        prices = replace(prices, instance_hour={**prices.instance_hour,
                                                instance_type: instance_price})
        notes.append(f"GPU hosts: {instance_type} at ${instance_price:g} an hour, as given")
    if database_price is not None and database_class:
        prices = replace(prices, database_hour={**prices.database_hour,
                                                database_class: database_price})
        notes.append(f"database: {database_class} at ${database_price:g} an hour, as given")
    return prices, notes


def prices_for(session: Any | None, region: str, instance_type: str,
               database_class: str | None, want_spot: bool = False
               ) -> tuple[Prices, str | None]:
    """The region's prices from the API when it can be read; else the shipped ones, with a note
    saying so (and why). ``want_spot``: read the account's Spot price history too."""
    spot: dict[str, Any] = {}
    if session is not None:
        import threading

        from botocore.config import Config

        answer: dict[str, Any] = {}

        def ask() -> None:
            try:
                # One try, short timeouts: the shipped prices are a good answer too.
                pricing = session.client("pricing", region_name=PRICING_REGION, config=Config(
                    connect_timeout=5, read_timeout=20, retries={"max_attempts": 1}))
                answer["prices"] = account_prices(pricing, region, instance_type, database_class)
            except CnsqError as error:
                answer["why"] = str(error)
            except Exception as error:  # noqa: BLE001 - no credentials, denied, unreachable
                answer["why"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]

        # A total time for the look-up: a read timeout bounds each read, and an endpoint that
        # trickles a byte at a time never trips it. The thread left behind ends with the command.
        def ask_spot() -> None:
            import time

            try:
                ec2 = session.client("ec2", region_name=region, config=Config(
                    connect_timeout=5, read_timeout=20, retries={"max_attempts": 1}))
                answer["spot"] = account_spot(ec2, instance_type, time.time())
            except Exception:  # noqa: BLE001 - denied or unreachable: the shipped expectation
                answer["spot"] = None

        asking = threading.Thread(target=ask, name="price-list", daemon=True)
        spotting = threading.Thread(target=ask_spot, name="spot-prices", daemon=True)
        asking.start()
        if want_spot:
            spotting.start()
        asking.join(PRICES_SECONDS)
        if want_spot:
            spotting.join(max(1.0, PRICES_SECONDS / 4))
        if answer.get("spot") is not None:
            found = {**shipped_prices().spot_hour, instance_type: answer["spot"]}
            spot = {"spot_hour": found, "spot_source": (
                f"the account's Spot price history ({region}, the last day's mean over its "
                "zones, an expectation)")}
        if "prices" in answer:
            return replace(answer["prices"], **spot), None
        why = answer.get("why") or f"no answer within {PRICES_SECONDS:g} s"
    else:
        why = "--offline"
    shipped = replace(shipped_prices(), **spot)
    note = f"Prices: {shipped.source}, not the Price List API ({why})"
    if region != shipped.region:
        note += f"; {region}'s prices may differ"
    return shipped, note

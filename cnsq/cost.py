"""What a run costs: prices (read from the AWS Price List API, or the dated file shipped in the
package) and a usage (host hours, Lambda GB-seconds …) make a bill, item by item.

One home for the arithmetic: ``cnsq estimate``, ``cnsq status`` and the simulation
(:mod:`cnsq.simulation`) all call :func:`bill`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .errors import CnsqError

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
    sqs_request: float
    nat_hour: float
    nat_gb: float
    load_balancer_hour: float
    load_balancer_lcu_hour: float
    date: str = ""

    def instance(self, instance_type: str) -> float:
        try:
            return self.instance_hour[instance_type]
        except KeyError:
            raise CnsqError(
                f"No price for {instance_type} in {self.source}: run `cnsq estimate` with AWS "
                f"credentials (pricing:GetProducts) or pass --instance-price") from None

    def database(self, instance_class: str) -> float:
        try:
            return self.database_hour[instance_class]
        except KeyError:
            raise CnsqError(
                f"No price for {instance_class} in {self.source}: run `cnsq estimate` with AWS "
                f"credentials (pricing:GetProducts) or pass --database-price") from None


def shipped_prices() -> Prices:
    """The dated prices shipped in the package (us-east-1 list prices)."""
    text = resources.files("cnsq").joinpath(f"data/prices-{SHIPPED_REGION}.json").read_text()
    raw: dict[str, Any] = json.loads(text)
    date = raw.pop("date")
    raw.pop("source")
    return Prices(source=f"the prices shipped with cnsq ({SHIPPED_REGION}, {date})", date=date, **raw)


@dataclass
class Usage:
    """What a run used. Seconds for the things billed by the hour."""

    instance_seconds: float = 0.0
    lambda_gb_seconds: float = 0.0
    lambda_requests: float = 0.0
    sqs_requests: float = 0.0
    nat_seconds: float = 0.0
    nat_gb: float = 0.0
    database_seconds: float = 0.0
    load_balancer_seconds: float = 0.0
    load_balancer_lcu_hours: float = 0.0


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


def bill(usage: Usage, prices: Prices, instance_type: str, database_class: str | None) -> Bill:
    """The items of a run, each quantity × its price. ``database_class`` None: no database
    (an adopted or external one is not the stack's to bill)."""
    hour = 3600.0
    items = [
        Item(f"GPU hosts ({instance_type})", usage.instance_seconds / hour, "h",
             prices.instance(instance_type), 0.0),
        Item("Lambda compute", usage.lambda_gb_seconds, "GB-s", prices.lambda_gb_second, 0.0),
        Item("Lambda requests", usage.lambda_requests, "requests", prices.lambda_request, 0.0),
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
    return Bill([Item(i.name, i.quantity, i.unit, i.price, i.quantity * i.price) for i in items])

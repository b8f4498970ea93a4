"""cnsq estimate: checked against a hand computation from the shipped prices, and reading the
region's prices from a Price List API endpoint on 127.0.0.1 (moto does not model it)."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from cnsq.cli import main
from cnsq.config import load_config
from cnsq.ops.estimate import PerTile, estimate
from cnsq.ops.pricing import shipped_prices
from support.servers import PricingServer


def test_a_million_tiles_by_hand(project):
    values = load_config("config/config.yml").values  # the example: 1 g4dn.xlarge, scaling
    result = estimate(1_000_000, values, shipped_prices(), PerTile(100.0, 1.5, 50.0))
    # By hand: 1,000,000 / 100 tiles/s = 10,000 s, + 360 s of host start (180 s boot, 90 s
    # the model's image and load, 3 health checks 30 s apart) = 10,360 s.
    hours = 10_360 / 3600
    expected = {
        "GPU hosts (g4dn.xlarge)": hours * 0.526,
        # calls × s × GB: the example's 128 MB on arm64, at arm64's price
        # (a call: the 1.5 s it waits, plus 16 ms of CPU at 128/1769 of a vCPU)
        "Lambda compute (arm64)": 100_000 * (1.5 + 0.016 * 1769 / 128) * 0.125 * 0.0000133334,
        "Lambda requests (arm64)": 100_000 * 0.0000002,
        "SQS requests": (100_000 + 2 * 100_000) * 0.0000004,  # batches of 10, receive, delete
        "NAT gateway hours": hours * 0.045,
        "NAT data processed": 50.0 * 0.045,  # 1,000,000 × 50 KB
        "Load balancer hours": hours * 0.0225,
        "Load balancer capacity": 50.0 * 4 / 3 * 0.008,
        "Database (db.t3.medium)": hours * 0.072,
        # The smaller standing parts, prorated over a 730-hour month: 20 GB of gp3; two secrets
        # (the tile token, RDS's password); 6 metrics per host and 5 of the stack; the
        # controller's 10 metrics read a minute. (No NAT address: this project's VPC is given.)
        "Database storage": 20 * hours / 730 * 0.115,
        "Secrets Manager secrets": 2 * hours / 730 * 0.40,
        "Custom metrics": (6 + 5) * hours / 730 * 0.30,
        "Metrics read (GetMetricData)": 10 * 10_360 / 60 * 0.00001,
    }
    got = {item.name: item.cost for item in result.bill.items}
    assert got == pytest.approx(expected)
    assert result.bill.total == pytest.approx(sum(expected.values()))
    assert result.seconds == 10_360 and result.hosts == 1
    # idleMinutes 2, then the controller's next minute ends the host
    assert result.idle.total == pytest.approx(3 / 60 * 0.526)


def test_a_worker_that_reads_cog_imagery_pays_its_cpu(project):
    """imagery.cog or imagery.stac: the worker reads, reprojects and encodes each tile itself, 11
    ms of CPU a tile at one vCPU (bench.py cog); the estimate counted a call's CPU as for XYZ
    tiles, which it only downloads."""
    from pathlib import Path

    path = Path("config/config.yml")
    text = path.read_text()
    path.write_text(text.replace("  ecs:\n", "  imagery:\n    cog: https://example.com/a.tif\n"
                                              "  ecs:\n", 1))
    values = load_config(path).values
    result = estimate(1_000_000, values, shipped_prices(), PerTile(100.0, 1.5, 50.0))
    got = {item.name: item.cost for item in result.bill.items}
    # a call: the 1.5 s it waits, plus 16 ms of the handler's CPU and 10 tiles × 11 ms of
    # reading, at 128/1769 of a vCPU (the example's memory)
    cpu = 0.016 + 10 * 0.011
    assert got["Lambda compute (arm64)"] == pytest.approx(
        100_000 * (1.5 + cpu * 1769 / 128) * 0.125 * 0.0000133334)
    assert any("reads each tile itself" in note for note in result.notes)


PRODUCTS = [
    ("AmazonEC2", {"instanceType": "g4dn.xlarge", "regionCode": "eu-west-1",
                   "operatingSystem": "Linux", "tenancy": "Shared", "preInstalledSw": "NA",
                   "capacitystatus": "Used", "usagetype": "EU-BoxUsage:g4dn.xlarge"}, 0.587),
    # A Windows price the filters must leave out.
    ("AmazonEC2", {"instanceType": "g4dn.xlarge", "regionCode": "eu-west-1",
                   "operatingSystem": "Windows", "tenancy": "Shared", "preInstalledSw": "NA",
                   "capacitystatus": "Used", "usagetype": "EU-BoxUsage:g4dn.xlarge"}, 0.771),
    ("AmazonEC2", {"productFamily": "NAT Gateway", "regionCode": "eu-west-1",
                   "usagetype": "EU-NatGateway-Hours"}, 0.048),
    ("AmazonEC2", {"productFamily": "NAT Gateway", "regionCode": "eu-west-1",
                   "usagetype": "EU-NatGateway-Bytes"}, 0.048),
    ("AmazonRDS", {"instanceType": "db.t3.medium", "regionCode": "eu-west-1",
                   "databaseEngine": "PostgreSQL", "deploymentOption": "Single-AZ",
                   "usagetype": "EU-InstanceUsage:db.t3.medium"}, 0.078),
    ("AWSLambda", {"regionCode": "eu-west-1", "usagetype": "EU-Lambda-GB-Second-ARM"}, 0.0000133334),
    ("AWSLambda", {"regionCode": "eu-west-1", "usagetype": "EU-Lambda-GB-Second"}, 0.0000166667),
    # Lambda@Edge's request ends in "-Request" too; listed first, it was taken for the worker's.
    ("AWSLambda", {"regionCode": "eu-west-1", "usagetype": "EU-Lambda-Edge-Request"}, 0.0000006),
    ("AWSLambda", {"regionCode": "eu-west-1", "usagetype": "EU-Request-ARM"}, 0.00000021),
    ("AWSLambda", {"regionCode": "eu-west-1", "usagetype": "EU-Request"}, 0.0000002),
    ("AWSQueueService", {"regionCode": "eu-west-1", "usagetype": "EU-Requests-Tier1"}, 0.0000004),
    ("AWSELB", {"productFamily": "Load Balancer-Application", "regionCode": "eu-west-1",
                "usagetype": "EU-LoadBalancerUsage"}, 0.0252),
    ("AWSELB", {"productFamily": "Load Balancer-Application", "regionCode": "eu-west-1",
                "usagetype": "EU-LCUUsage"}, 0.008),
    ("AmazonRDS", {"productFamily": "Database Storage", "regionCode": "eu-west-1",
                   "usagetype": "EU-RDS:GP3-Storage"}, 0.127),
    ("AWSSecretsManager", {"regionCode": "eu-west-1", "usagetype": "EU-AWSSecretsManager-Secrets"}, 0.40),
    ("AmazonCloudWatch", {"regionCode": "eu-west-1", "usagetype": "EU-CW:MetricMonitorUsage"}, 0.30),
    ("AmazonCloudWatch", {"regionCode": "eu-west-1", "usagetype": "EU-CW:GMD-Metrics"}, 0.00001),
    # (No public IPv4 price: taken from the shipped file, and said.)
]


def _estimate_json(server, monkeypatch) -> dict:
    """`cnsq estimate 1000000 --region eu-west-1 --json` against ``server`` (closed after)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_PRICING", server.url)
    try:
        result = CliRunner().invoke(main, ["estimate", "1000000", "--region", "eu-west-1",
                                           "--json"], catch_exceptions=False)
    finally:
        server.close()
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_regions_prices_come_from_the_price_list_api(project, monkeypatch):
    from pathlib import Path

    path = Path("config/config.yml")  # an x86 worker (the example's is arm64)
    path.write_text(path.read_text().replace("      architecture: arm64\n", "      architecture: x86_64\n", 1))
    server = PricingServer(PRODUCTS)
    report = _estimate_json(server, monkeypatch)
    assert report["prices"] == ("the AWS Price List API (eu-west-1); public ipv4 hour from the "
                                f"prices shipped with cnsq ({shipped_prices().date})")
    price = {item["name"]: item["price"] for item in report["items"]}
    assert price["GPU hosts (g4dn.xlarge)"] == 0.587  # Linux, not the Windows price
    assert price["Lambda compute"] == 0.0000166667  # x86, not ARM; the paid tier
    assert price["Lambda requests"] == 0.0000002  # not Lambda@Edge's, not Arm's
    assert price["Database (db.t3.medium)"] == 0.078
    assert price["NAT data processed"] == 0.048
    assert price["Database storage"] == 0.127
    assert not [n for n in report["notes"] if n.startswith("Prices:")]
    assert all(c["FormatVersion"] == "aws_v1" for c in server.calls)


def test_an_arm64_worker_is_billed_at_arm64s_prices(project, monkeypatch):
    """`lambdas.<Name>.architecture: arm64` was billed at x86's rate (a fifth dearer)."""
    from pathlib import Path

    path = Path("config/config.yml")
    assert "      architecture: arm64\n" in path.read_text()  # the example's
    report = _estimate_json(PricingServer(PRODUCTS), monkeypatch)
    price = {item["name"]: item["price"] for item in report["items"]}
    assert price["Lambda compute (arm64)"] == 0.0000133334
    assert price["Lambda requests (arm64)"] == 0.00000021
    assert "Lambda compute" not in price
    shipped = estimate(1_000_000, load_config(path).values, shipped_prices())
    arm = next(i for i in shipped.bill.items if i.name == "Lambda compute (arm64)")
    assert arm.price == 0.0000133334  # the shipped prices have Arm's too


def test_without_the_api_the_shipped_prices_are_used_and_said(project, monkeypatch):
    server = PricingServer(PRODUCTS[:1])  # no NAT, database … prices: the API cannot answer
    monkeypatch.setenv("AWS_ENDPOINT_URL_PRICING", server.url)
    try:
        result = CliRunner().invoke(main, ["estimate", "1000", "--region", "eu-west-1"],
                                    catch_exceptions=False)
    finally:
        server.close()
    assert result.exit_code == 0, result.output
    assert ("Prices: the prices shipped with cnsq (us-east-1, 2026-12-01), not the Price List API "
            "(the Price List API has no lambda gb second for eu-west-1); eu-west-1's prices may "
            "differ") in result.stdout
    offline = CliRunner().invoke(main, ["estimate", "1000", "--offline"], catch_exceptions=False)
    assert "not the Price List API (--offline)" in offline.stdout


def test_an_instance_type_without_a_shipped_price_is_a_clear_error(project):
    from pathlib import Path

    path = Path("config/config.yml")
    path.write_text(path.read_text().replace("instanceType: g4dn.xlarge", "instanceType: g6e.2xlarge"))
    result = CliRunner().invoke(main, ["estimate", "1000", "--offline"])
    assert result.exit_code == 1
    assert "No price for g6e.2xlarge in the prices shipped with cnsq" in result.output
    # The way out it names is an option the command has (it named one it did not have).
    assert result.output.rstrip().endswith("or pass --instance-price"), result.output
    given = CliRunner().invoke(main, ["estimate", "1000", "--offline", "--instance-price", "2.24",
                                      "--database-price", "0.5", "--json"])
    assert given.exit_code == 0, given.output
    answer = json.loads(given.stdout)
    gpu = [i for i in answer["items"] if "g6e.2xlarge" in i["name"]]
    assert gpu and all(i["price"] == 2.24 for i in gpu), answer["items"]
    database = [i for i in answer["items"] if i["unit"] == "h" and "atabase" in i["name"]]
    assert database and all(i["price"] == 0.5 for i in database), answer["items"]
    assert "GPU hosts: g6e.2xlarge at $2.24 an hour, as given" in answer["notes"]
    bad = CliRunner().invoke(main, ["estimate", "1000", "--instance-price", "nan"])
    assert bad.exit_code == 2 and "--instance-price" in bad.output


@pytest.mark.parametrize("hostile, why", [
    ("growing-token", "or with a NextToken no AWS answer has: not read further"),
    ("infinity", "answered 'Infinity' where a price belongs"),
    ("trickle", "no answer within 3 s"),
])
def test_a_hostile_price_list_falls_back_to_the_shipped_prices(project, monkeypatch, hostile, why):
    """A NextToken growing on every page reached 2 GB; a trickling answer hung over 200 s; a price
    of Infinity printed $inf and exited 0. Pages, token and time are bounded, a price must be a
    finite number, and the shipped prices answer instead, said so."""
    from cnsq.ops import pricing

    monkeypatch.setattr(pricing, "PRICES_SECONDS", 3.0)
    report = _estimate_json(PricingServer(PRODUCTS, hostile=hostile), monkeypatch)
    assert report["prices"].startswith("the prices shipped with cnsq")
    assert any(why in note for note in report["notes"]), report["notes"]
    assert math.isfinite(report["total"]) and math.isfinite(report["perMillion"])


@pytest.mark.parametrize("args, message", [
    (["--call-seconds", "nan"], "nan is not a finite number"),
    (["--tiles-per-second", "inf"], "'--tiles-per-second'"),
    (["--tile-kb", "nan"], "nan is not a finite number"),
])
def test_options_that_are_not_finite_are_usage_errors(project, args, message):
    result = CliRunner().invoke(main, ["estimate", "1000", "--offline", "--json", *args])
    assert result.exit_code == 2 and message in result.output
    assert "NaN" not in result.stdout and "$nan" not in result.output


def test_a_count_past_any_map_is_a_usage_error(project):
    result = CliRunner().invoke(main, ["estimate", "1" + "0" * 40, "--offline"])
    assert result.exit_code == 2 and "TILES" in result.output and "Traceback" not in result.output


def test_estimate_from_a_clone_without_a_config_uses_the_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["estimate", "1000000", "--offline"])
    assert result.exit_code == 0, result.output
    assert "No config/config.yml: the example config's values (config.example.yml)." in result.stderr
    assert "1,000,000 tiles on cnsq-dev" in result.stdout


def test_estimate_into_a_closed_pipe_says_nothing_of_it(tmp_path):
    import subprocess
    import sys

    done = subprocess.run(f"{sys.executable} -m cnsq.cli estimate 1000000 --offline | head -1",
                          shell=True, capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert done.stdout.startswith("1,000,000 tiles on cnsq-dev")
    assert "Broken pipe" not in done.stderr and "BrokenPipeError" not in done.stderr


def test_spot_hosts_are_priced_at_the_expected_spot_price_and_said(project):
    from pathlib import Path

    path = Path("config/config.yml")
    path.write_text(path.read_text().replace("  ecs:\n", "  ecs:\n    spot: 75\n", 1))
    values = load_config(path).values
    result = estimate(1_000_000, values, shipped_prices(), PerTile(100.0, 1.5, 50.0))
    hours = 10_360 / 3600  # as by hand above: one host
    cost = {item.name: item.cost for item in result.bill.items}
    assert cost["GPU hosts (g4dn.xlarge)"] == pytest.approx(hours * 0.25 * 0.526)
    assert cost["GPU hosts, Spot (g4dn.xlarge, expected)"] == pytest.approx(hours * 0.75 * 0.21)
    assert any("75 % of the host hours on Spot at the Spot prices shipped with cnsq" in n
               and "an expectation" in n for n in result.notes)
    # the idle tail too: 3 minutes of one host, three quarters of it at Spot's price
    assert result.idle.total == pytest.approx(3 / 60 * (0.25 * 0.526 + 0.75 * 0.21))


def test_the_accounts_spot_history_is_the_expectation_when_it_can_be_read(project):
    """moto answers DescribeSpotPriceHistory: the estimate takes the mean of each zone's latest
    price, and says where it came from."""
    import time

    import boto3

    from cnsq.ops.pricing import account_spot, prices_for

    ec2 = boto3.client("ec2", region_name="us-east-1")
    found = account_spot(ec2, "g4dn.xlarge", time.time())
    assert found is not None and found > 0
    prices, _ = prices_for(boto3.Session(region_name="us-east-1"), "us-east-1", "g4dn.xlarge",
                           "db.t3.medium", want_spot=True)
    assert prices.spot("g4dn.xlarge") == pytest.approx(found)
    assert prices.spot_source.startswith("the account's Spot price history (us-east-1")

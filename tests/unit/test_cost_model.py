"""One cost model: `cnsq estimate`'s breakdown of the reference job (a million tiles, up to four
GPU hosts, the example config) against the simulation's bill of the same job, line by line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnsq.config import load_config
from cnsq.ops.estimate import estimate
from cnsq.ops.pricing import Parts, shipped_prices
from simulation import SPOT_DOCUMENTED, Setup, World, simulate

REPO = Path(__file__).resolve().parents[2]
PRICES = shipped_prices()


def example(tmp_path: Path, spot: int) -> dict:
    text = (REPO / "config" / "config.example.yml").read_text()
    assert "    maxInstances: 1\n" in text
    text = text.replace("    maxInstances: 1\n", f"    maxInstances: 4\n    spot: {spot}\n", 1)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yml").write_text(text)
    (tmp_path / "config" / ".env").write_text("RDS_USERNAME=admin\nTILE_ACCESS_TOKEN=t\n")
    return load_config(tmp_path / "config" / "config.yml", environ={}).values


@pytest.mark.parametrize("egress, spot", [("nat", 0), ("ipv6", 0), ("ipv6", 100)])
def test_each_line_of_the_estimate_is_within_ten_percent_of_the_simulation(tmp_path, egress, spot):
    values = example(tmp_path, spot)
    estimated = estimate(1_000_000, values, PRICES, egress=egress)
    world = World(spot_interruptions_per_hour=SPOT_DOCUMENTED if spot else 0.0)
    simulated = simulate(Setup(parts=Parts(egress=egress), spot=spot), 1_000_000, PRICES, world)
    assert simulated.written == 1_000_000
    lines = {i.name: i.cost for i in simulated.bill.items}
    assert set(lines) == {i.name for i in estimated.bill.items}
    for item in estimated.bill.items:
        assert item.cost == pytest.approx(lines[item.name], rel=0.10, abs=0.001), item.name
    assert estimated.idle.total == pytest.approx(simulated.tail.total, rel=0.10)
    assert estimated.seconds == pytest.approx(simulated.drained_at, rel=0.10)

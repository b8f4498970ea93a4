"""The controller judged in the discrete-event simulation of the stack (simulation), against
the best fixed configurations a grid search finds in the same simulator. The figures the simulation
runs on are documented in simulation.World; these tests check behaviour, bench.py tune prints
the report."""

from __future__ import annotations

import pytest

pytest.importorskip("simpy")

from cnsq.ops.pricing import shipped_prices  # noqa: E402
from simulation import Setup, World, simulate, tune  # noqa: E402

PRICES = shipped_prices()


@pytest.mark.slow
def test_a_million_tiles_from_zero_hosts_against_the_best_fixed_setups():
    tuned = tune(Setup(), 1_000_000, PRICES, workers=2)
    auto = tuned.controller
    assert auto.written == 1_000_000 and auto.dead_letter == 0
    assert auto.gpu_utilisation >= 0.85
    ratios = tuned.ratios()
    assert ratios["time"] <= 1.10, (ratios, tuned.fastest[0])
    assert ratios["cost"] <= 1.10, (ratios, tuned.cheapest[0])
    assert auto.hosts_at_minimum_after is not None
    # idleMinutes (15), then the capacity provider's scale-in of an empty host (15 one-minute
    # datapoints): the controller lowers the service, never the group.
    assert auto.hosts_at_minimum_after <= (15 + 15 + 5) * 60
    assert all(o.written == 1_000_000 for o in tuned.fixed.values())


def test_from_scenario_1_to_scenario_4_within_twelve_minutes():
    """Concurrency 40 on one GPU host whose model takes 0.2 s a tile: calls time out (scenario 1).
    The deployed controller reads CloudWatch's minutes, which trail by up to two (the newest is
    not yet reported): ten minutes of cutting, as with exact minutes, plus that delay."""
    heavy = World(gpu_fixed_s=0.05, gpu_per_tile_s=0.2)
    setup = Setup(max_instances=1, warm_instances=1, concurrency=40, lambda_timeout=60,
                  visibility_timeout=360)
    outcome = simulate(setup, 20_000, PRICES, heavy)
    scenarios = [(s.t, s.scenario) for s in outcome.samples]
    assert any(scenario == 1 for _, scenario in scenarios[:4]), scenarios[:5]
    reached = next(t for t, scenario in scenarios if scenario == 4)
    assert reached <= 720, scenarios[:14]
    at_four = next(s for s in outcome.samples if s.scenario == 4)
    assert at_four.concurrency < 40  # it got there by lowering, not by luck
    assert outcome.dead_letter == 0 and outcome.written == 20_000
    assert any(line.startswith("lowered concurrency") for _, line in outcome.decisions[:4])


def test_no_tile_is_lost_while_the_hosts_boot_and_would_be_without_the_pause():
    setup = Setup(max_instances=1, visibility_timeout=30, max_receive_count=2, concurrency=5)
    paused = simulate(setup, 5_000, PRICES)
    assert paused.dead_letter == 0 and paused.written == 5_000
    assert paused.decisions[0] == (
        60.0, "model tasks 0 → 1: 5000 tiles waiting: 1 model tasks (up to 1)")
    assert paused.samples[0].receiving is False
    unpaused = simulate(Setup(**{**setup.__dict__, "pause_without_model": False}), 5_000, PRICES)
    assert unpaused.dead_letter > 0  # the simulation can fail: the 503s of the boot reach the DLQ


def test_the_bill_is_the_usage_at_the_shipped_prices():
    outcome = simulate(Setup(fixed=1, concurrency=10), 20_000, PRICES)
    hosts = next(i for i in outcome.bill.items if i.name.startswith("GPU hosts"))
    assert hosts.cost == pytest.approx(outcome.usage.instance_seconds / 3600 * 0.526)
    assert outcome.usage.instance_seconds == pytest.approx(outcome.drained_at)  # one host, from launch
    assert outcome.bill.total == pytest.approx(sum(i.cost for i in outcome.bill.items))

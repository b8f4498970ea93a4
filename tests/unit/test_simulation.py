"""The controller judged in the discrete-event simulation of the stack (simulation), against
the best fixed configurations a grid search finds in the same simulator. The figures the simulation
runs on are documented in simulation.World; these tests check behaviour, bench.py tune prints
the report."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("simpy")

from cnsq.ops.pricing import shipped_prices  # noqa: E402
from simulation import Setup, World, simulate  # noqa: E402

PRICES = shipped_prices()


@pytest.mark.slow
def test_a_million_tiles_from_zero_hosts_against_the_grid_of_fixed_setups():
    """The baseline world of the evaluation (simulation.evaluation), the size `bench.py tune`
    runs: nothing lost, the drain within 10 % of the fastest fixed setup, the hosts back at the
    minimum within idleMinutes and the capacity provider's scale-in."""
    from simulation.evaluation import cases, evaluate

    setup = Setup(max_instances=4)
    [baseline] = evaluate(setup, PRICES, cases()[:1], workers=2)
    assert baseline.goals["done"] and baseline.goals["time within 10 %"], baseline.ratios()
    outcome = simulate(setup, 1_000_000, PRICES)
    assert outcome.written == 1_000_000 and outcome.dead_letter == 0
    assert outcome.gpu_utilisation >= 0.85
    # idleMinutes (2), then the capacity provider's scale-in of an empty host (15 one-minute
    # datapoints), a minute each for the queue's lagging count and the controller's step.
    assert outcome.hosts_at_minimum_after is not None
    assert outcome.hosts_at_minimum_after <= (2 + 15 + 3) * 60


def _said(line: str) -> dict[str, float]:
    """The readings a decision line gives: ``model 97 % busy, p95 4.1 s of 60 s, errors 0%``."""
    found = re.search(r"model (\d+) % busy, p95 ([\d.]+) s of (\d+) s, errors (\d+)%", line)
    assert found, line
    busy, p95, timeout, errors = map(float, found.groups())
    return {"busy": busy, "load": p95 / timeout, "errors": errors / 100}


def test_from_scenario_1_to_scenario_4_within_twelve_minutes():
    """Concurrency 40 on one GPU host whose model takes 0.2 s a tile: calls time out. The
    controller must see scenario 1 for what it is (errors, calls near the timeout), cut, and
    reach scenario 4 (a busy GPU, short calls, no errors) within twelve minutes, though the
    deployed controller reads CloudWatch's minutes, which trail by up to two."""
    heavy = World(gpu_fixed_s=0.05, gpu_per_tile_s=0.2)
    setup = Setup(max_instances=1, warm_instances=1, concurrency=40, lambda_timeout=60,
                  visibility_timeout=360)
    outcome = simulate(setup, 20_000, PRICES, heavy)
    scenarios = [(s.t, s.scenario) for s in outcome.samples]
    assert any(scenario == 1 for _, scenario in scenarios[:4]), scenarios[:5]
    cuts = [line for _, line in outcome.decisions if line.startswith("lowered concurrency 40")]
    assert cuts, outcome.decisions[:4]
    first_cut = _said(cuts[0])
    assert first_cut["errors"] > 0.05 and first_cut["load"] >= 0.8  # scenario 1's evidence
    reached = next(t for t, scenario in scenarios if scenario == 4)
    assert reached <= 720, scenarios[:14]
    at_four = next(s for s in outcome.samples if s.scenario == 4)
    assert at_four.concurrency < 40 and at_four.gpu_percent is not None
    assert at_four.gpu_percent >= 90  # a full GPU …
    probes = [_said(line) for t, line in outcome.decisions if t >= reached and "probing" in line]
    assert probes and all(p["errors"] == 0 and p["load"] < 0.5 and p["busy"] >= 90
                          for p in probes)  # … short calls, no errors: scenario 4's evidence
    assert outcome.dead_letter == 0 and outcome.written == 20_000


def test_no_tile_is_lost_while_the_hosts_boot_and_would_be_without_the_pause():
    setup = Setup(max_instances=1, visibility_timeout=30, max_receive_count=2, concurrency=5)
    paused = simulate(setup, 5_000, PRICES)
    assert paused.dead_letter == 0 and paused.written == 5_000
    assert paused.decisions[0] == (
        0.0, "model tasks 0 → 1: 5000 tiles waiting: 1 model tasks (up to 1)")  # push kicked it
    assert paused.samples[0].receiving is False
    unpaused = simulate(Setup(**{**setup.__dict__, "pause_without_model": False}), 5_000, PRICES)
    assert unpaused.dead_letter > 0  # the simulation can fail: the 503s of the boot reach the DLQ


def test_a_push_starts_the_hosts_before_sqs_counts_show_its_tiles():
    """`cnsq push` invokes the controller as it sends: its first step comes at once, not on
    the schedule's minute, and launches hosts on the count pushed, as SQS's approximate counts
    (a minute behind) still read an empty queue."""
    kicked = simulate(Setup(max_instances=1), 5_000, PRICES)
    scheduled = simulate(Setup(max_instances=1, push_kicks=False), 5_000, PRICES)
    assert kicked.decisions[0] == (0.0, "model tasks 0 → 1: 5000 tiles waiting: 1 model tasks (up to 1)")
    assert scheduled.decisions[0][0] == 60.0
    assert kicked.written == scheduled.written == 5_000
    assert kicked.drained_at is not None and scheduled.drained_at is not None
    assert kicked.drained_at <= scheduled.drained_at - 50


def test_the_bill_is_the_usage_at_the_shipped_prices():
    outcome = simulate(Setup(fixed=1, concurrency=10), 20_000, PRICES)
    hosts = next(i for i in outcome.bill.items if i.name.startswith("GPU hosts"))
    assert hosts.cost == pytest.approx(outcome.usage.instance_seconds / 3600 * 0.526)
    assert outcome.usage.instance_seconds == pytest.approx(outcome.drained_at)  # one host, from launch
    assert outcome.bill.total == pytest.approx(sum(i.cost for i in outcome.bill.items))


def test_spot_interruptions_lose_nothing_and_spot_hours_are_billed_at_spots_price():
    """Two Spot hosts reclaimed four times an hour each (a stress far beyond the Spot Instance
    Advisor's worst bucket): calls queued on a reclaimed host fail and are retried on the other,
    or come back through the queue; no tile is lost or dead-lettered."""
    from simulation import SPOT_DOCUMENTED, SPOT_PESSIMISTIC

    assert SPOT_DOCUMENTED < SPOT_PESSIMISTIC
    setup = Setup(max_instances=2, spot=100)
    stressed = simulate(setup, 200_000, PRICES, World(spot_interruptions_per_hour=4.0))
    assert stressed.interruptions >= 3
    assert stressed.written == 200_000 and stressed.dead_letter == 0
    calm = simulate(setup, 200_000, PRICES)
    assert calm.interruptions == 0 and calm.written == 200_000
    assert stressed.drained_at > calm.drained_at  # each reclaim costs a host's restart
    names = [item.name for item in calm.bill.items]
    assert "GPU hosts, Spot (g4dn.xlarge, expected)" in names
    assert "GPU hosts (g4dn.xlarge)" not in names  # all of it Spot
    spot = next(i for i in calm.bill.items if i.name.startswith("GPU hosts, Spot"))
    assert spot.price == PRICES.spot("g4dn.xlarge")
    assert spot.quantity == pytest.approx(calm.usage.spot_instance_seconds / 3600)


def test_a_spot_share_keeps_the_rest_of_the_hosts_on_demand():
    outcome = simulate(Setup(max_instances=4, spot=50), 200_000, PRICES)
    assert outcome.usage.instance_seconds > 0 and outcome.usage.spot_instance_seconds > 0
    assert outcome.usage.instance_seconds == pytest.approx(outcome.usage.spot_instance_seconds,
                                                           rel=0.25)

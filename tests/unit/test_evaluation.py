"""The evaluation of the controller (simulation.evaluation): its rules on figures made by hand,
and a short held-out world run for real, where the controller must meet its goals and a
"controller" that keeps its setup fixed must not."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

pytest.importorskip("simpy")

from cnsq.ops.pricing import shipped_prices  # noqa: E402
from simulation import Setup  # noqa: E402
from simulation.evaluation import Case, Judged, Result, cases, evaluate, judge, summary  # noqa: E402

PRICES = shipped_prices()


def _r(minutes: float, per_million: float, jobs: tuple[float, ...] = ()) -> Result:
    return Result(minutes, per_million, 1_000_000, 0, jobs or (minutes,))


def _judged(controller: Result, fixed: dict, user=(4, 35), jobs=(1_000_000,)) -> Judged:
    return judge(Judged(Case("w", cases()[0].world, jobs), controller, fixed, user))


def test_a_fixed_setup_better_by_more_than_5_percent_on_both_dominates():
    fixed = {(4, 35): _r(42.6, 5.08), (4, 60): _r(40.5, 5.78), (3, 20): _r(58.7, 4.94)}
    # 40.5 < 0.95 × 43.0 and 5.78 < 0.95 × 6.17: dominated, though within 10 % of the fastest.
    judged = _judged(_r(43.0, 6.17), fixed)
    assert judged.dominating() == [(4, 60)]
    assert judged.goals["time within 10 %"] and not judged.goals["not dominated"]
    assert not judged.goals["beats the user's setup"]  # 43.0 × 6.17 > 42.6 × 5.08
    # Better than each fixed setup on one measure or within 5 % on it: not dominated.
    assert _judged(_r(42.0, 5.90), fixed).goals["not dominated"]
    assert [k for k, _ in judged.front()] == [(4, 60), (4, 35), (3, 20)]


def test_a_setup_that_lost_tiles_is_never_the_best():
    fixed = {(4, 70): Result(30.0, 4.0, 999_990, 10, (30.0,)), (4, 35): _r(42.6, 5.08)}
    judged = _judged(_r(44.0, 5.2), fixed)
    assert judged.fastest[0] == judged.cheapest[0] == (4, 35)
    lost = _judged(Result(44.0, 5.2, 999_990, 10, (44.0,)), fixed)
    assert not lost.goals["done"]


def test_the_day_is_compared_with_the_cheapest_always_on_stack_as_fast_on_each_job():
    jobs = (200_000, 1_000_000, 50_000)
    controller = Result(300.0, 8.0, 1_250_000, 0, (16.0, 43.0, 10.0))
    fixed = {(4, 25): Result(290.0, 15.1, 1_250_000, 0, (12.0, 42.0, 4.0)),
             (3, 20): Result(300.0, 12.0, 1_250_000, 0, (15.0, 56.0, 5.0)),  # slower on job 2
             (4, 65): Result(289.0, 16.3, 1_250_000, 0, (10.0, 40.0, 3.0))}
    judged = _judged(controller, fixed, user=(4, 25), jobs=jobs)
    assert judged.always_on()[0] == (4, 25)
    assert judged.goals["day ≤ 0.6 × always-on"]  # 8.0 ≤ 0.6 × 15.1
    dearer = _judged(replace(controller, dollars=9.5), fixed, user=(4, 25), jobs=jobs)
    assert not dearer.goals["day ≤ 0.6 × always-on"]


def test_the_summary_counts_only_the_held_out_worlds():
    fixed = {(4, 35): _r(42.6, 5.08)}
    tuned = judge(Judged(replace(cases()[0], name="t"), _r(80.0, 9.0), fixed, (4, 35)))
    held = [judge(Judged(Case(f"h{i}", cases()[0].world), _r(40.0, 5.0), fixed, (4, 35)))
            for i in range(8)]
    verdict = summary([tuned, *held])
    assert verdict["held_out"] == 8 and verdict["beats_user"] == 8 and verdict["all"]
    slow = [*held[:6], *(replace(j, controller=_r(60.0, 5.0)) for j in held[6:])]
    verdict = summary([tuned, *(judge(j) for j in slow)])
    assert verdict["beats_user"] == 6 and not verdict["all"]
    assert ("h6", "time within 10 %") in verdict["failed"]


@pytest.fixture(scope="module")
def held_out() -> list[Judged]:
    """One GPU host, 300,000 tiles: the baseline (where the user picks a fixed setup) and a
    world the controller was not tuned on, an imagery server three times as slow. About 15 s.
    The worker at 1024 MB on x86: where calls cost enough that the user's best setup keeps
    concurrency low (at the example's 128 MB on arm64 a call costs a seventh, the user's best
    concurrency is high enough for slower imagery too, and this world tells the two apart less:
    docs/operating.md's table is measured with the example's)."""
    worlds = [c for c in cases(tiles=300_000) if c.name in ("baseline", "downloads ×3")]
    return evaluate(Setup(max_instances=1, reserved=60, lambda_memory_mb=1024,
                          lambda_architecture="x86_64"), PRICES, worlds)


def test_in_a_held_out_world_the_controller_keeps_pace_and_beats_the_users_setup(held_out):
    world = held_out[1]
    assert world.case.name == "downloads ×3" and not world.case.tuned_on
    assert world.goals["done"], world.controller
    assert world.goals["time within 10 %"], world.ratios()
    assert world.goals["beats the user's setup"], world.ratios()


def test_a_controller_that_keeps_concurrency_and_tasks_fixed_fails_the_criteria(held_out):
    """The user's setup (best on the baseline), run in the controller's place: the slower
    imagery leaves its GPU waiting, so it is slower than the fastest fixed setup by more than
    10 %, and no better than itself."""
    world = held_out[1]
    fixed = world.fixed[world.user]
    as_controller = judge(replace(world, controller=fixed))
    assert as_controller.goals["done"]
    assert not as_controller.goals["time within 10 %"], as_controller.ratios()
    assert not as_controller.goals["beats the user's setup"]
    assert math.isclose(as_controller.ratios()["score_vs_user"], 1.0)


def test_the_users_setup_is_run_in_a_world_whose_sweep_stopped_below_it():
    """A world's sweep stops past saturation; the user's setup (from the baseline) may lie
    beyond it and is run there all the same (bench tune failed with a KeyError)."""
    worlds = [c for c in cases(tiles=60_000) if c.name in ("baseline", "GPU ×0.5")]
    setup = Setup(max_instances=1, reserved=30)
    grids: dict = {}
    first = evaluate(setup, PRICES, worlds, grids=grids)
    user = first[0].user
    del grids["GPU ×0.5"][user]
    again = evaluate(setup, PRICES, worlds, grids=grids)
    assert user in grids["GPU ×0.5"] and again[1].user_result is grids["GPU ×0.5"][user]


def test_the_spot_world_runs_every_setup_on_spot_and_loses_nothing():
    worlds = [c for c in cases(tiles=60_000) if c.name in ("baseline", "Spot at 0.5/h")]
    assert worlds[1].spot == 100 and not worlds[1].tuned_on
    base, spot = evaluate(Setup(max_instances=1, reserved=30), PRICES, worlds)
    assert spot.controller.done and spot.user_result.done
    # Spot's expected price ($0.21 against $0.53 an hour): the same job costs less.
    assert spot.controller.dollars < 0.8 * base.controller.dollars
    assert spot.user_result.dollars < 0.8 * base.user_result.dollars

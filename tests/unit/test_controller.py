"""The concurrency decision (download_and_predict.scaling.decide): a pure function, tested on its own, and on
a small closed-form plant: calls queue at a model that holds ``capacity`` at once."""

from __future__ import annotations

import pytest

from download_and_predict.scaling import Decision, Limits, Signals, decide


def signals(**changes) -> Signals:
    base = dict(healthy=True, backlog=1000, in_flight=10, calls=50, model_errors=0,
                p95_seconds=6.0, timeout_seconds=120.0, busy_percent=41.0)
    return Signals(**{**base, **changes})


def test_under_used_model_and_short_calls_raise_concurrency():
    decision = decide(signals(), 20)
    assert (decision.concurrency, decision.scenario, decision.receive) == (30, 3, True)
    assert decision.line(20) == "raised concurrency 20 → 30: model 41 % busy, p95 6.0 s of 120 s, errors 0%"


def test_calls_timing_out_with_errors_halve_it():
    decision = decide(signals(p95_seconds=110.0, model_errors=10, busy_percent=100.0), 40)
    assert (decision.concurrency, decision.scenario) == (20, 1)


def test_long_calls_on_a_busy_model_lower_it_a_little():
    decision = decide(signals(p95_seconds=70.0, busy_percent=95.0), 20)
    assert (decision.concurrency, decision.scenario) == (16, 2)


def test_a_busy_model_short_calls_and_no_errors_keep_it():
    decision = decide(signals(busy_percent=90.0), 20)
    assert (decision.concurrency, decision.scenario) == (20, 4)
    assert decision.line(20).startswith("kept concurrency 20: model 90 % busy")


def test_no_model_pauses_receiving_and_no_work_changes_nothing():
    paused = decide(signals(healthy=False), 20)
    assert not paused.receive and paused.concurrency == 20
    assert paused.line(20) == "paused receiving: no model answers: no tile is taken to fail"
    assert decide(signals(backlog=0, in_flight=0), 20) == Decision(20, True, 0, "no work")


@pytest.mark.parametrize("current, busy, expected", [
    # Under-used by a little: a probe's step, not +8.4 % (within the hysteresis: a GPU whose
    # batches wait on TF Serving's batch timeout sat at 89 % busy, never raised; the simulation)
    (100, 89.5, 125),
    (1, 10.0, 2),     # one step at least, from the bottom
    (900, 10.0, 1000),  # never above the high limit
])
def test_steps_are_bounded_and_small_changes_are_not_made(current, busy, expected):
    assert decide(signals(busy_percent=busy), current).concurrency == expected


def test_the_low_limit_holds():
    decision = decide(signals(p95_seconds=110.0, model_errors=10), 2, Limits(low=2))
    assert decision.concurrency == 2


def _plant(concurrency: int, capacity: int = 8) -> Signals:
    """Calls queue at a model that works ``capacity`` calls at once: a call takes 5 s, and 5 s
    more for each round of calls queued before it; past 80 % of the timeout, calls fail."""
    queued = max(0, concurrency - capacity)
    p95 = 5.0 + 5.0 * queued / capacity * 8
    errors = 50 if p95 >= 96 else 0
    return signals(p95_seconds=p95, model_errors=errors, busy_percent=min(100.0, 100.0 * concurrency / capacity))


@pytest.mark.parametrize("start, first", [(40, 1), (2, 3)])
def test_from_either_side_it_reaches_the_optimal_scenario_in_a_few_steps(start, first):
    """Scenario 1 (40 calls on one model of 8) or 3 (2 calls) to scenario 4 in a few steps."""
    current, scenarios = start, []
    for _ in range(10):
        decision = decide(_plant(current), current)
        scenarios.append(decision.scenario)
        if decision.scenario == 4:
            break
        current = decision.concurrency
    assert scenarios[0] == first and scenarios[-1] == 4, scenarios
    final = _plant(current)
    assert final.busy_percent >= 80 and final.p95_seconds < 60 and final.model_errors == 0


class _Plant:
    """A model that works ``capacity`` calls at once: each call takes ``work`` seconds on it, and
    waits for a free place first; ``busy()`` reports its busy seconds as cnsq serve does."""

    def __init__(self, capacity: int = 6, work: float = 0.02):
        import threading

        self.places = threading.Semaphore(capacity)
        self.capacity, self.work = capacity, work
        self.busy_seconds = 0.0
        self.lock = threading.Lock()

    def busy(self):
        with self.lock:
            return self.busy_seconds, self.capacity

    def process(self, event):
        import time
        from types import SimpleNamespace

        with self.places:
            time.sleep(self.work)
            with self.lock:
                self.busy_seconds += self.work
        records = event["Records"]
        return SimpleNamespace(records=len(records), written=len(records), skipped=0, failed={})


def test_auto_concurrency_raises_the_calls_until_the_model_is_busy():
    from cnsq.local.pipeline import AutoConcurrency, run_pipeline
    from cnsq.tiles import Line

    plant = _Plant(capacity=6)
    lines = [Line(i + 1, __import__("mercantile").Tile(i % 100, i // 100, 12)) for i in range(6000)]
    auto = AutoConcurrency(plant.busy, len(lines), start=1, high=32, interval=0.2)
    report = run_pipeline(lines, plant, 32, 10, None, auto)
    assert report.tiles == 6000 and not report.failed
    assert auto.decisions and auto.decisions[0].startswith("raised concurrency 1 → 2")
    assert auto.limit >= 5  # the model's six places in use, or nearly
    # No call waited long: the only steps down are probes of a busy model that gained nothing.
    assert all("lowered" not in line or "gained" in line for line in auto.decisions)


# The model tasks' count (the stack's controller; the simulation runs the same function).

def capacity(**changes):
    from download_and_predict.scaling import Capacity

    base = dict(min_tasks=0, max_tasks=8, tasks_per_instance=1, idle_seconds=900,
                backlog_per_task=6000)
    return Capacity(**{**base, **changes})


def test_a_backlog_from_zero_asks_for_the_tasks_it_needs_up_to_the_maximum():
    from download_and_predict.scaling import plan_tasks

    assert plan_tasks(work=1_000_000, desired=0, idle_for=None, c=capacity()) == (
        8, "1000000 tiles waiting: 8 model tasks (up to 8)")
    assert plan_tasks(work=100, desired=0, idle_for=None, c=capacity())[0] == 1
    assert plan_tasks(work=13_000, desired=0, idle_for=None, c=capacity())[0] == 3


def test_tasks_fill_whole_hosts_and_never_shrink_while_work_remains():
    from download_and_predict.scaling import plan_tasks

    four_gpus = capacity(tasks_per_instance=4, max_tasks=16)
    assert plan_tasks(work=7000, desired=0, idle_for=None, c=four_gpus)[0] == 4
    assert plan_tasks(work=10, desired=12, idle_for=None, c=four_gpus)[0] == 12


def test_idle_tasks_wait_idle_minutes_then_go_to_the_minimum():
    from download_and_predict.scaling import plan_tasks

    assert plan_tasks(work=0, desired=8, idle_for=600, c=capacity()) == (8, "idle 10 min of 15: kept")
    assert plan_tasks(work=0, desired=8, idle_for=900, c=capacity()) == (
        0, "idle 15 min: down to the minimum, 0 model tasks")
    assert plan_tasks(work=0, desired=0, idle_for=5000, c=capacity(min_tasks=2))[0] == 2


def test_concurrency_follows_the_model_tasks():
    from download_and_predict.scaling import follow_tasks

    assert follow_tasks(current=10, tasks_before=1, tasks_now=4, limits=Limits()) == 40
    assert follow_tasks(current=40, tasks_before=4, tasks_now=0, limits=Limits()) == 40  # paused instead
    assert follow_tasks(current=5, tasks_before=0, tasks_now=2, limits=Limits()) == 10
    assert follow_tasks(current=900, tasks_before=1, tasks_now=2, limits=Limits()) == 1000


# A busy GPU is not yet a full one: TF Serving's batches fill with more calls queued. In scenario
# 4 with short calls the controller probes a higher concurrency and keeps it only if the tiles
# per second per task rose.

def test_a_busy_model_with_short_calls_is_probed_higher_and_the_gain_kept():
    from download_and_predict.scaling import Probe

    first = decide(signals(busy_percent=95.0, p95_seconds=2.0, throughput=80.0), 20)
    assert (first.concurrency, first.scenario) == (25, 4)
    assert first.probe == Probe(concurrency=20, throughput=80.0, hold=0)
    assert first.line(20).startswith("raised concurrency 20 → 25: probing")
    again = decide(signals(busy_percent=97.0, p95_seconds=2.5, throughput=84.0), 25, probe=first.probe)
    assert again.concurrency == 32 and again.probe.throughput == 84.0
    # A gain of 10 % or more: the model is far from full, the next probe steps by 1.5.
    far = decide(signals(busy_percent=97.0, p95_seconds=2.5, throughput=90.0), 25, probe=first.probe)
    assert far.concurrency == 38 and far.probe == Probe(concurrency=25, throughput=90.0, hold=0)


def test_a_probe_that_gained_nothing_goes_back_and_holds():
    from download_and_predict.scaling import Probe

    back = decide(signals(busy_percent=99.0, p95_seconds=3.0, throughput=81.0), 25,
                  probe=Probe(concurrency=20, throughput=80.0, hold=0))
    assert back.concurrency == 20 and back.probe.hold == 10
    assert "gained 1.2 %" in back.line(25)
    held = decide(signals(busy_percent=95.0, p95_seconds=2.0, throughput=80.0), 20, probe=back.probe)
    assert held.concurrency == 20 and held.probe.hold == 9


def test_one_step_keeps_the_idle_clock_and_goes_down_after_the_idle_time():
    from download_and_predict.scaling import Bounds, Memory, Observed, step

    bounds = Bounds(low=2, high=100, min_tasks=0, max_tasks=8, tasks_per_instance=2,
                    idle_seconds=900, horizon_seconds=600)
    idle = signals(backlog=0, in_flight=0, calls=0)
    memory, actions = step(Memory(concurrency=20, healthy_before=4),
                           Observed(1000.0, idle, 4, 4, 20, True), bounds)
    assert (memory.idle_since, actions.tasks, actions.concurrency) == (1000.0, 4, 20)
    memory, actions = step(memory, Observed(1000.0 + 899, idle, 4, 4, 20, True), bounds)
    assert actions.tasks == 4 and memory.idle_since == 1000.0  # not yet
    memory, actions = step(memory, Observed(1000.0 + 900, idle, 4, 4, 20, True), bounds)
    assert actions.tasks == 0 and actions.lines[0].startswith("model tasks 4 → 0: idle 15 min")
    # Work again: the clock stops, tasks come back by the backlog.
    memory, actions = step(memory, Observed(2000.0, signals(backlog=5000, throughput=1.0), 0, 0,
                                            20, True), bounds)
    assert memory.idle_since is None and actions.tasks == 8


def test_one_step_reapplies_its_concurrency_over_a_deploys_and_clamps_to_the_bounds():
    from download_and_predict.scaling import Bounds, Memory, Observed, step

    bounds = Bounds(low=2, high=30, max_tasks=4)
    memory, actions = step(Memory(concurrency=24, healthy_before=1),
                           Observed(0.0, signals(busy_percent=30.0), 1, 1, 5, True), bounds)
    assert "re-applied concurrency 24 (a deploy set 5)" in actions.lines
    assert actions.concurrency == 30 == memory.concurrency  # raised, within the reserved 30
    _, low = step(Memory(concurrency=2), Observed(0.0, signals(
        p95_seconds=110.0, model_errors=10, busy_percent=100.0), 1, 1, 2, True), bounds)
    assert low.concurrency == 2  # halved, but never under the mapping's least


def test_the_next_jobs_tasks_do_not_multiply_the_concurrency_of_the_last():
    """Found in the simulation's day of three jobs: 29 calls for 4 tasks, the tasks gone while
    idle, 4 back for the next job: 29 × 4 / 1 = 116, then 200 on the third job."""
    from download_and_predict.scaling import Bounds, Memory, Observed, step

    bounds = Bounds(low=2, high=200, min_tasks=0, max_tasks=4, idle_seconds=0)
    memory = Memory(concurrency=29, healthy_before=4, changed_at=-300.0)
    idle = signals(backlog=0, in_flight=0, calls=0, healthy=False)
    memory, _ = step(memory, Observed(0.0, idle, 0, 0, 29, False), bounds)
    again = signals(backlog=1_000_000, in_flight=0, calls=0)
    memory, actions = step(memory, Observed(600.0, again, 4, 4, 29, True), bounds)
    assert actions.concurrency == 29 and memory.healthy_before == 4


def test_a_raise_waits_until_the_signals_describe_the_last_change():
    """CloudWatch's minutes come a minute late: the minute after a raise still describes the
    concurrency before it. With ``settle_seconds`` 180 nothing is raised again, and no probe
    judged, until three minutes after a change; a lowering is made at once."""
    from download_and_predict.scaling import Bounds, Memory, Observed, step

    bounds = Bounds(low=2, high=200, max_tasks=1, settle_seconds=180)
    idle_gpu = signals(busy_percent=40.0)
    memory, actions = step(Memory(concurrency=20, healthy_before=1, changed_at=-180.0),
                           Observed(0.0, idle_gpu, 1, 1, 20, True), bounds)
    assert actions.concurrency == 30 and memory.changed_at == 0.0
    for minute in (1, 2):
        memory, actions = step(memory, Observed(60.0 * minute, idle_gpu, 1, 1, 30, True), bounds)
        assert actions.concurrency == 30 and memory.changed_at == 0.0
    # EventBridge's schedule a few seconds early still ends the third minute.
    memory, actions = step(memory, Observed(175.0, idle_gpu, 1, 1, 30, True), bounds)
    assert actions.concurrency == 45
    failing = signals(p95_seconds=110.0, model_errors=10, busy_percent=100.0)
    _, actions = step(memory, Observed(240.0, failing, 1, 1, 45, True), bounds)
    assert actions.concurrency == 22  # at once, though the raise was a minute ago


def test_a_resume_between_the_minutes_settles_by_the_clock_not_by_steps():
    """Receiving resumed 30 s into a minute (a look between the minutes): the third scheduled
    step after it still has 30 s before the resume in its window, so it waits one more."""
    from download_and_predict.scaling import Bounds, Memory, Observed, step

    bounds = Bounds(low=2, high=200, max_tasks=1, settle_seconds=180)
    waiting = signals(healthy=False)
    memory, actions = step(Memory(concurrency=20, healthy_before=1, changed_at=-600.0),
                           Observed(0.0, waiting, 0, 1, 20, False), bounds)
    assert not actions.receive and actions.recheck
    first = signals(calls=0, busy_percent=None, p95_seconds=None)
    memory, actions = step(memory, Observed(30.0, first, 1, 1, 20, False), bounds)
    assert actions.receive and not actions.recheck and memory.changed_at == 30.0
    for now in (60.0, 120.0, 180.0):
        memory, actions = step(memory, Observed(now, signals(busy_percent=40.0), 1, 1, 20, True),
                               bounds)
        assert actions.concurrency == 20, now
    _, actions = step(memory, Observed(240.0, signals(busy_percent=40.0), 1, 1, 20, True), bounds)
    assert actions.concurrency == 30


def test_the_step_asks_for_a_second_look_only_while_work_waits_for_a_starting_model():
    from download_and_predict.scaling import Bounds, Memory, Observed, step

    bounds = Bounds(low=2, high=200, min_tasks=0, max_tasks=4, settle_seconds=180)
    waiting = signals(backlog=5000, in_flight=0, calls=0, healthy=False)
    _, actions = step(Memory(), Observed(0.0, waiting, 0, 0, 10, False), bounds)
    assert actions.tasks == 4 and not actions.receive and actions.recheck
    nothing = signals(backlog=0, in_flight=0, calls=0, healthy=False)
    _, actions = step(Memory(), Observed(0.0, nothing, 0, 0, 10, False), bounds)
    assert actions.tasks == 0 and not actions.recheck
    answering = signals(backlog=5000, in_flight=0, calls=0)
    _, actions = step(Memory(), Observed(0.0, answering, 1, 4, 10, False), bounds)
    assert actions.receive and not actions.recheck


def test_a_probe_survives_the_minutes_it_waits_for_its_signals():
    """A probe raised from an under-used GPU (scenario 3) was dropped while the signals settled,
    and judged as no probe: a gain of 14 % went unseen and the next raise was the small step."""
    from download_and_predict.scaling import Probe

    started = Probe(concurrency=40, throughput=189.0)
    waiting = decide(signals(busy_percent=87.0, throughput=200.0), 50, probe=started, settled=False)
    assert waiting.concurrency == 50 and waiting.probe == started
    judged = decide(signals(busy_percent=94.0, p95_seconds=0.7, throughput=216.0), 50,
                    probe=waiting.probe)
    assert judged.concurrency == 75  # 14 % gained: far from full, the next step is 1.5


def test_a_later_job_is_sized_by_the_rate_measured_under_full_load():
    """The day of three jobs: the 50,000-tile job started all four hosts, as any job did before
    its own calls were measured (1,000 tiles a task by default). The rate measured while the
    last job's backlog was a minute's work or more sizes the next: 50,000 tiles are cleared by
    one task at 118 tiles/s before another host (12 minutes away) would help."""
    from download_and_predict.scaling import Bounds, Memory, Observed, step

    bounds = Bounds(low=2, high=200, min_tasks=0, max_tasks=4, horizon_seconds=720)
    busy = signals(backlog=500_000, throughput=118.0, busy_percent=99.0, p95_seconds=1.0)
    memory, _ = step(Memory(concurrency=50, healthy_before=4), Observed(0.0, busy, 4, 4, 50, True),
                     bounds)
    assert memory.rate == 118.0
    tail = signals(backlog=2_000, throughput=40.0)  # the job's end: not full load, not kept
    memory, _ = step(memory, Observed(60.0, tail, 4, 4, 50, True), bounds)
    assert memory.rate == 118.0
    fresh = Observed(7200.0, signals(backlog=50_000, in_flight=0, calls=0, throughput=None,
                                     healthy=False), 0, 0, 50, False)
    _, actions = step(memory, fresh, bounds)
    assert actions.tasks == 1
    _, unknown = step(Memory(), fresh, bounds)
    assert unknown.tasks == 4  # never measured: 1,000 tiles a task, as before

"""How many handler calls to run at once: one decision, from the original README's four scenarios.

Lambda concurrency and model capacity must be scaled in tandem. :func:`decide` is that decision as
a pure function — measurements in, a concurrency and whether to receive work out, with its
reason — so that the same rules serve ``cnsq run --concurrency auto`` on one machine (its own
measurements) and the stack's controller (CloudWatch's). It lives in the Lambda package because
both sides use it; its thresholds (:data:`THRESHOLDS`) are the ones ``cnsq status`` diagnoses
with: one home.

Steps are bounded (at most ×1.5 up, ×0.5 down) and small changes are not made (hysteresis), so
the decision does not chase noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# What each scenario is told by (cnsq status's diagnosis uses the same).
THRESHOLDS = {
    "errors_high": 0.05,  # error rate above which Lambdas are failing for real
    "errors_low": 0.01,  # error rate of a healthy run
    "slow": 0.8,  # p95 duration / timeout: Lambdas are timing out
    "busy_duration": 0.5,  # p95 duration / timeout: Lambdas wait on the model
    # % utilisation of a well-fed GPU. 90, not the original README's ~80: in the simulation
    # (simulation), GPUs kept at 80-87 % left a fifth of the throughput unused while calls
    # were still short; TF Serving's batching turns queued calls into fuller GPU batches.
    "gpu_busy": 90.0,
    "gpu_aim": 97.0,  # what a raise aims at: concurrency × gpu_aim / busy
}
# EventBridge's one-minute schedule may invoke a few seconds early or late; a step that ends the
# settling interval this much early still counts (its window then holds a few seconds more).
SETTLE_SLACK_SECONDS = 10.0


@dataclass(frozen=True)
class Signals:
    """What the controller sees over the last interval."""

    healthy: bool  # the model answers (AWS: a healthy target; one machine: the server)
    backlog: int  # tiles waiting
    in_flight: int  # tiles being worked on
    calls: int  # handler calls finished in the interval
    model_errors: int  # of them, calls whose prediction failed (timeouts, 5xx, no time left)
    p95_seconds: float | None  # 95th percentile of a call's duration
    timeout_seconds: float  # what a call may take (the Lambda's timeout)
    busy_percent: float | None  # the model's utilisation (GPU busy; the server's busy share)
    throughput: float | None = None  # tiles written per second per model task
    # Records (tiles) the handler reported in the interval. A record that fails is a batch item
    # failure: the invocation itself succeeds, so ``model_errors`` (failed calls) never sees it.
    records_ok: int | None = None
    records_failed: int = 0

    @property
    def error_rate(self) -> float:
        """The larger of the failed calls' share and the failed records' share."""
        rate = self.model_errors / self.calls if self.calls else 0.0
        records = (self.records_ok or 0) + self.records_failed
        if records:
            rate = max(rate, self.records_failed / records)
        return rate

    @property
    def succeeding(self) -> bool:
        """False when work was done in the interval and none of it succeeded: every record
        failed, or tiles were processed at a measured rate of zero. More tasks or more calls
        would only fail faster (and burn receive counts into the dead letter queue)."""
        if self.records_ok == 0 and self.records_failed > 0:
            return False
        return not (self.calls > 0 and self.throughput == 0)


@dataclass(frozen=True)
class Probe:
    """What the last raise of a busy model started from: kept from one interval to the next (the
    stack keeps it in a parameter, one machine in memory). ``hold``: intervals before probing again."""

    concurrency: int
    throughput: float
    hold: int = 0


@dataclass(frozen=True)
class Limits:
    low: int = 1
    high: int = 1000
    step_up: float = 1.5
    step_down: float = 0.5
    # A change smaller than this share of the current value is not made.
    hysteresis: float = 0.1
    probe_step: float = 1.25  # a probe of a busy model: this much more concurrency
    probe_gain: float = 0.03  # kept when tiles per second per task rose by this share
    # A probe that gained this much (the model far from full): the next one steps by step_up.
    probe_far: float = 0.10
    probe_hold: int = 10  # intervals without a probe after one that gained nothing


@dataclass(frozen=True)
class Decision:
    concurrency: int
    receive: bool  # False: take no work (no model to send it to)
    scenario: int  # 1-4 as in the README, 0: not one of them
    reason: str
    probe: Probe | None = None  # to pass to the next decision

    def line(self, current: int, receiving: bool = True) -> str:
        """``raised concurrency 20 → 30: GPUs 41 % busy, p95 6 s of 120 s``; ``receiving``:
        whether work was being received before this decision."""
        if not self.receive:
            return f"paused receiving: {self.reason}"
        if not receiving:
            return f"resumed receiving at concurrency {self.concurrency}: a model answers"
        if self.concurrency > current:
            return f"raised concurrency {current} → {self.concurrency}: {self.reason}"
        if self.concurrency < current:
            return f"lowered concurrency {current} → {self.concurrency}: {self.reason}"
        return f"kept concurrency {current}: {self.reason}"


def _evidence(s: Signals, error_rate: float) -> str:
    parts = []
    if s.busy_percent is not None:
        parts.append(f"model {s.busy_percent:.0f} % busy")
    if s.p95_seconds is not None:
        parts.append(f"p95 {s.p95_seconds:.1f} s of {s.timeout_seconds:.0f} s")
    parts.append(f"errors {error_rate:.0%}")
    return ", ".join(parts)


def decide(s: Signals, current: int, limits: Limits = Limits(),
           probe: Probe | None = None, settled: bool = True) -> Decision:
    """The concurrency for the next interval, and whether to receive work at all.

    ``probe``: the previous decision's :attr:`Decision.probe`. A busy model (scenario 4) with
    short calls is not yet a full one — TF Serving's batches fill as more calls queue — so the
    concurrency is raised by ``probe_step`` and kept only while the tiles per second per task rise
    by ``probe_gain``; a probe that gained less goes back and waits ``probe_hold`` intervals.

    ``settled``: False while the signals may still describe the concurrency before the last
    change (CloudWatch reports minutes late): nothing is raised, and a probe is not judged, on
    them; a lowering (scenarios 1 and 2) is made at once.
    """
    if not s.healthy:
        return Decision(current, False, 0, "no model answers: no tile is taken to fail")
    if s.backlog == 0 and s.in_flight == 0:
        return Decision(current, True, 0, "no work")
    if s.calls == 0 and not s.records_failed:
        return Decision(current, True, 0, "no call finished yet")
    t = THRESHOLDS
    error_rate = s.error_rate
    load = s.p95_seconds / s.timeout_seconds if s.p95_seconds is not None else None
    busy = s.busy_percent
    why = _evidence(s, error_rate)
    if error_rate > t["errors_high"] and (load is None or load >= t["slow"]):
        scenario, factor = 1, limits.step_down
    elif load is not None and load >= t["busy_duration"] and (busy is None or busy >= t["gpu_busy"]):
        scenario, factor = 2, 0.8
    elif busy is not None and busy >= t["gpu_busy"] and error_rate <= t["errors_low"]:
        if not settled:
            return Decision(current, True, 4, why, probe)
        return _probe(s, current, limits, probe, why)
    elif error_rate > t["errors_high"]:
        scenario, factor = 0, 0.8  # failing, though not for time: do not add to it
    elif busy is None:
        # No utilisation to read: short calls without errors mean room to grow, carefully.
        scenario, factor = 3, 1.25 if (load is None or load < t["busy_duration"]) else 1.0
    else:
        # Under-used: at least a probe's step (a GPU whose batches wait on TF Serving's batch
        # timeout never reads 90 % busy, and a smaller raise is within the hysteresis), judged
        # like a probe by the tiles per second it gains.
        scenario = 3
        factor = min(limits.step_up, max(limits.probe_step, t["gpu_aim"] / max(busy, 1.0)))
        if settled and s.throughput is not None:
            return _probe(s, current, limits, probe, why, scenario, factor)
    if factor > 1 and not settled:
        factor = 1.0
    wanted = current * factor
    target = math.ceil(wanted) if factor > 1 else math.floor(wanted)
    target = max(limits.low, min(limits.high, target))
    if target != current and abs(target - current) < max(1.0, limits.hysteresis * current):
        target = current
    # Kept: a probe under way is still judged when the signals settle; changed: it is over.
    return Decision(target, True, scenario, why, probe if target == current else None)


@dataclass(frozen=True)
class Capacity:
    """The model tasks the stack may run (``ecs.minInstances``/``maxInstances`` × tasks per
    instance), how long an idle stack keeps them (``ecs.idleMinutes``), and how many waiting tiles
    justify one more task (``backlog_per_task``: a task's rate × the time a new host takes to help,
    see :func:`backlog_per_task`)."""

    min_tasks: int
    max_tasks: int
    tasks_per_instance: int
    idle_seconds: float
    backlog_per_task: int


def backlog_per_task(tiles_per_second: float | None, horizon_seconds: float, default: int) -> int:
    """Tiles one task clears in ``horizon_seconds`` (a host's boot and registration, doubled):
    a backlog smaller than that is finished before another host would help."""
    if not tiles_per_second or tiles_per_second <= 0:
        return default
    return max(1, int(tiles_per_second * horizon_seconds))


def plan_tasks(work: int, desired: int, idle_for: float | None, c: Capacity,
               succeeding: bool = True) -> tuple[int, str]:
    """The model tasks for the next minute, and why.

    ``work``: tiles waiting or in flight; ``desired``: the tasks asked for now; ``idle_for``: seconds
    since the queue emptied with nothing in flight (None while there is work).

    With work, the count rises to what the backlog justifies, in whole hosts, up to the maximum,
    and never falls: a task stopped mid-run fails the calls it holds, and a job's tail is short.
    Without work, the tasks stay ``idle_seconds`` (a new batch of tiles finds them warm), then go
    to the minimum. ``succeeding`` False (see :attr:`Signals.succeeding`): no task is added while
    nothing succeeds, beyond the first one that shows whether anything can.
    """
    if work > 0 and not succeeding:
        kept = max(desired, c.min_tasks, 1)
        return kept, f"{work} tiles waiting but none succeeds: {kept} model tasks, none added"
    if work > 0:
        wanted = max(1, c.min_tasks, math.ceil(work / max(1, c.backlog_per_task)))
        per = max(1, c.tasks_per_instance)
        wanted = min(c.max_tasks, math.ceil(wanted / per) * per)
        if wanted <= desired:
            return desired, f"{work} tiles waiting: {desired} model tasks kept"
        return wanted, f"{work} tiles waiting: {wanted} model tasks (up to {c.max_tasks})"
    idle = idle_for or 0.0
    if idle < c.idle_seconds:
        if desired <= c.min_tasks:
            return max(desired, c.min_tasks), "no work"
        return desired, f"idle {idle / 60:.0f} min of {c.idle_seconds / 60:.0f}: kept"
    return c.min_tasks, (f"idle {idle / 60:.0f} min: down to the minimum, "
                         f"{c.min_tasks} model tasks")


def follow_tasks(current: int, tasks_before: int, tasks_now: int, limits: Limits) -> int:
    """Concurrency scaled with the healthy model tasks (the two are scaled in tandem): the calls
    per task the decision found stay the same when tasks come or go. With no task there is no
    call to scale (receiving is paused instead), so the value is kept; from none, the value is
    what the first task takes (the config's ``concurrent`` is sized for one GPU) and grows with
    the tasks that answer."""
    if tasks_now <= 0 or tasks_now == tasks_before:
        return current
    tasks_before = max(1, tasks_before)
    return max(limits.low, min(limits.high, math.ceil(current * tasks_now / tasks_before)))


def _probe(s: Signals, current: int, limits: Limits, probe: Probe | None, why: str,
           scenario: int = 4, step: float | None = None) -> Decision:
    """Keep, or try more concurrency (``step``; a probe's by default) and judge the last raise by
    the tiles per second per task it gained: scenario 4, and scenario 3 once throughput is read."""
    if s.throughput is None or (s.p95_seconds is not None and
                                s.p95_seconds >= THRESHOLDS["busy_duration"] * s.timeout_seconds / 2):
        return Decision(current, True, scenario, why, probe)
    step = step or limits.probe_step
    if probe is not None and probe.concurrency < current and probe.throughput > 0:
        gain = s.throughput / probe.throughput - 1
        if gain >= limits.probe_far:
            step = max(step, limits.step_up)
        if gain < limits.probe_gain:
            why = f"{current} calls gained {gain * 100:.1f} % tiles/s over {probe.concurrency}"
            return Decision(probe.concurrency, True, scenario, why,
                            Probe(probe.concurrency, probe.throughput, limits.probe_hold))
    elif probe is not None and probe.hold > 0:
        return Decision(current, True, scenario, why, Probe(probe.concurrency, probe.throughput,
                                                             probe.hold - 1))
    target = min(limits.high, max(current + 1, math.ceil(current * step)))
    if target <= current:
        return Decision(current, True, scenario, why, probe)
    return Decision(target, True, scenario, f"probing: {why}, {s.throughput:.0f} tiles/s per task",
                    Probe(current, s.throughput, 0))


# -- one step of the controller --------------------------------------------------------------
# The stack's controller (control.py, every minute), the simulation (simulation/) and `cnsq run
# --concurrency auto` each read their own world and apply the result their own way; what they
# decide is this one function, so that what is judged in the simulation is what runs on AWS.


@dataclass(frozen=True)
class Bounds:
    """What a controller may set. ``low``/``high``: the concurrency's range (on AWS 2, the
    event source mapping's least, to the reserved concurrency); the model tasks' range and
    grouping, how long an idle stack keeps them, and ``horizon_seconds``, how long a new host
    takes to help (see :func:`backlog_per_task`). One machine has one model server: one task.
    ``settle_seconds``: how long after a change of the concurrency its signals describe it (the
    stack reads CloudWatch, whose minutes arrive late; one machine reads its own, at once):
    counted in seconds, not steps, as a step may come between the minutes (:attr:`Actions.recheck`)."""

    low: int = 1
    high: int = 1000
    min_tasks: int = 1
    max_tasks: int = 1
    tasks_per_instance: int = 1
    idle_seconds: float = 0.0
    horizon_seconds: float = 0.0
    settle_seconds: float = 0.0


@dataclass(frozen=True)
class Memory:
    """What one step leaves the next (the stack keeps it in a parameter, the others in memory)."""

    concurrency: int | None = None  # what this controller set last (None: never)
    healthy_before: int = 0  # model tasks answering at the last step that had any
    idle_since: float | None = None  # when the queue emptied, with nothing in flight
    probe: Probe | None = None
    # When the concurrency last changed or receiving resumed (None: not yet seen; a new
    # controller counts from its first step, as its window may hold a part of a minute).
    changed_at: float | None = None
    # Tiles per second per task measured under full load (a backlog of a minute's work or more):
    # a later job is sized by it before its own calls are measured.
    rate: float | None = None


@dataclass(frozen=True)
class Observed:
    """One interval's readings. ``signals.throughput``: tiles written per second per task."""

    now: float  # seconds (any epoch; only differences count)
    signals: Signals
    healthy_tasks: int  # model tasks answering now
    desired_tasks: int  # model tasks asked for now
    applied: int  # the concurrency in force
    receiving: bool  # whether work is being received


@dataclass(frozen=True)
class Actions:
    """What to apply: the model tasks to ask for (``tasks``; the same as asked: no change), the
    concurrency and whether to receive work, and each change as a line for the log."""

    tasks: int
    concurrency: int
    receive: bool
    scenario: int
    lines: tuple[str, ...]
    # Idle at the minimum: end the hosts beyond this many that run no task now, instead of
    # leaving them to ECS's scale-in 15 minutes later (None: leave the group alone).
    keep_hosts: int | None = None
    # Work waits for a model asked for and not yet answering: look again before the next
    # interval, so that receiving resumes as the first task turns healthy, not up to a minute on.
    recheck: bool = False


def step(memory: Memory, seen: Observed, bounds: Bounds) -> tuple[Memory, Actions]:
    """One interval of the controller: the model tasks (:func:`plan_tasks`), the concurrency
    scaled with the tasks that answer (:func:`follow_tasks`), then :func:`decide` over it.
    Pure: the same readings give the same actions, wherever they were read."""
    s = seen.signals
    work = s.backlog + s.in_flight
    idle_since = None if work else (memory.idle_since if memory.idle_since is not None else seen.now)
    loaded = (s.throughput is not None and s.throughput > 0 and seen.healthy_tasks > 0
              and s.backlog >= seen.healthy_tasks * s.throughput * 60)
    rate = s.throughput if loaded else memory.rate
    capacity = Capacity(
        min_tasks=bounds.min_tasks, max_tasks=bounds.max_tasks,
        tasks_per_instance=bounds.tasks_per_instance, idle_seconds=bounds.idle_seconds,
        backlog_per_task=backlog_per_task(s.throughput or rate, bounds.horizon_seconds, 1000))
    idle_for = None if idle_since is None else max(0.0, seen.now - idle_since)
    tasks, why = plan_tasks(work, seen.desired_tasks, idle_for, capacity, s.succeeding)
    lines = []
    if tasks != seen.desired_tasks:
        lines.append(f"model tasks {seen.desired_tasks} → {tasks}: {why}")
    current = memory.concurrency or seen.applied
    if memory.concurrency and seen.applied != memory.concurrency:
        lines.append(f"re-applied concurrency {memory.concurrency} (a deploy set {seen.applied})")
    followed = follow_tasks(current, memory.healthy_before, seen.healthy_tasks, Limits())
    changed_at = memory.changed_at if memory.changed_at is not None else seen.now
    if followed != current:
        changed_at = seen.now
    # A step a few seconds early (a schedule's jitter) still counts as the interval it ends.
    settled = seen.now - changed_at >= bounds.settle_seconds - SETTLE_SLACK_SECONDS
    decision = decide(s, followed, Limits(low=bounds.low, high=bounds.high), memory.probe,
                      settled=settled or bounds.settle_seconds <= 0)
    concurrency = max(bounds.low, min(bounds.high, decision.concurrency))
    if decision.concurrency != followed or decision.receive != seen.receiving:
        lines.append(decision.line(followed, seen.receiving))
    resumed = decision.receive and not seen.receiving
    if concurrency != followed or resumed:
        changed_at = seen.now
    # With no task answering, the concurrency stays the one chosen for the tasks that last did:
    # remember their count, or the next job's first tasks would multiply it again.
    answering = seen.healthy_tasks or memory.healthy_before
    at_rest = idle_for is not None and idle_for >= bounds.idle_seconds and tasks <= bounds.min_tasks
    keep = -(-bounds.min_tasks // bounds.tasks_per_instance) if at_rest else None
    waiting = work > 0 and tasks > 0 and seen.healthy_tasks == 0 and not decision.receive
    return (Memory(concurrency, answering, idle_since, decision.probe, changed_at, rate),
            Actions(tasks, concurrency, decision.receive, decision.scenario, tuple(lines), keep,
                    recheck=waiting))

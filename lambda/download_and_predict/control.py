"""The stack's controller: every minute, scale the model tasks and the Lambda concurrency in tandem.

A scheduled function (``ecs.minInstances`` set) that reads what ``cnsq status`` reads — the queue,
the target group's healthy targets, the worker's calls, errors and p95 duration, the load
balancer's 5xx, the GPUs' utilisation, the tiles deleted — and applies the decisions of
:mod:`download_and_predict.scaling`:

- the model service's desired count (:func:`~.controller.plan_tasks`): up with the backlog, in
  whole hosts, down to the minimum after ``idleMinutes``; the capacity provider's managed
  scaling sizes the group from it (the controller never touches the group: ECS owns it);
- the event source mapping: disabled while no target is healthy (scaled to zero, booting), so no
  tile is received only to fail into the dead letter queue; its ``MaximumConcurrency`` from
  :func:`~.controller.decide`, scaled with the healthy tasks.

Its state (the concurrency it chose, the probe, when the queue went idle, its last decisions) is a
JSON SSM parameter; ``cnsq status`` shows the decisions. A deploy sets the mapping back to the
template's starting value: the controller sees its own value gone and re-applies it within a
minute. Every call to AWS is in :class:`Controller`; the clients are passed in, so tests run it
against moto's server.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .scaling import Actions, Bounds, Memory, Observed, Probe, Signals, step

WINDOW = 180  # seconds of metrics read each minute (CloudWatch reports a minute late)
# Minutes after a change of the concurrency before the window holds only minutes after it: the
# minute of the change and the next are reported by the third (a minute late, as above).
SETTLE = 3
# While work waits for a model that is starting, each invocation looks at the target group every
# RECHECK seconds until BUDGET seconds have passed (the function's timeout is 50 s): a task turns
# healthy after 3 checks 30 s apart (the template's target group), at any second of the minute,
# and receiving resumes within RECHECK of it instead of at the next minute. Looking costs a
# 256 MB function's time (~$0.01 an hour of waiting), against a GPU host's ~$0.53.
RECHECK = 10.0
BUDGET = 40.0
# `cnsq push` invokes the controller as it sends (it need not wait for the schedule's minute) and
# says how many tiles it is sending: SQS's approximate counts trail the queue by about a minute
# (the SQS developer guide), so for that long the count pushed is the better reading.
PUSHED_FRESH = 90.0
KEPT_DECISIONS = 30
# A standard SSM parameter's value holds at most 4 KB (SSM's PutParameter reference: "Standard
# parameters have a value limit of 4 KB"); the state is kept within it, counted in UTF-8 bytes.
STATE_LIMIT = 4096
LINE_LIMIT = 240  # characters of one kept decision line
# The handler's record counts, published as embedded-metric log lines (handler.py).
RECORD_METRICS = ("RecordsSucceeded", "RecordsFailed")
GPU_METRIC = "nvidia_smi_utilization_gpu"


@dataclass(frozen=True)
class Where:
    """The stack's resources and limits, from the function's environment (the template sets it)."""

    queue_url: str
    function_name: str
    mapping_id: str
    cluster: str
    service: str
    group: str
    target_group: str
    gpu_namespace: str
    state_parameter: str
    balancer: str  # the load balancer's metric dimension (app/name/id)
    timeout: float
    min_tasks: int
    max_tasks: int
    tasks_per_instance: int
    idle_seconds: float
    max_concurrency: int
    horizon_seconds: float = 600.0

    @classmethod
    def from_environment(cls, env: dict[str, str] | None = None) -> Where:
        env = dict(os.environ) if env is None else env
        return cls(
            queue_url=env["QUEUE_URL"], function_name=env["WORKER_FUNCTION"],
            mapping_id=env["MAPPING_ID"], cluster=env["CLUSTER"], service=env["SERVICE"],
            group=env["GROUP"], target_group=env["TARGET_GROUP"],
            gpu_namespace=env["GPU_NAMESPACE"], state_parameter=env["STATE_PARAMETER"],
            balancer=env.get("BALANCER", ""), timeout=float(env["WORKER_TIMEOUT"]),
            min_tasks=int(env["MIN_TASKS"]), max_tasks=int(env["MAX_TASKS"]),
            tasks_per_instance=int(env["TASKS_PER_INSTANCE"]),
            idle_seconds=float(env["IDLE_SECONDS"]), max_concurrency=int(env["MAX_CONCURRENCY"]))


def _finite(value: Any) -> float | None:
    """A finite number, or None (a string, a bool, NaN, ±Infinity, 1e400 are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _count(value: Any, low: int = 0) -> int | None:
    number = _finite(value)
    if number is None or number != int(number) or number < low:
        return None
    return int(number)


@dataclass
class State:
    """What one minute leaves the next. Read leniently: state written by another version of cnsq
    (an extra key, a field of another type, a number JSON cannot hold) loses that field, never the
    controller; no non-finite number is ever written back."""

    concurrency: int | None = None
    healthy_before: int = 0
    idle_since: float | None = None
    probe: dict | None = None
    changed_at: float | None = None  # when the concurrency last changed (epoch seconds)
    rate: float | None = None  # tiles per second per task under full load, last measured
    decisions: list[list] = field(default_factory=list)  # [ISO time, line]

    @classmethod
    def parse(cls, text: str) -> State:
        try:
            # NaN and Infinity are not JSON: they become None, like any value out of range.
            raw = json.loads(text, parse_constant=lambda _: None)
        except (ValueError, RecursionError):
            return cls()
        if not isinstance(raw, dict):
            return cls()
        probe = raw.get("probe")
        if isinstance(probe, dict):
            concurrency, hold = _count(probe.get("concurrency"), 1), _count(probe.get("hold", 0))
            throughput = _finite(probe.get("throughput"))
            probe = (None if concurrency is None or hold is None or throughput is None
                     or throughput < 0 else
                     {"concurrency": concurrency, "throughput": throughput, "hold": hold})
        else:
            probe = None
        decisions = raw.get("decisions")
        kept = [[d[0], d[1]] for d in decisions if isinstance(d, list) and len(d) == 2
                and isinstance(d[0], str) and isinstance(d[1], str)
                ] if isinstance(decisions, list) else []
        idle_since = _finite(raw.get("idle_since"))
        changed_at = _finite(raw.get("changed_at"))
        rate = _finite(raw.get("rate"))
        return cls(concurrency=_count(raw.get("concurrency"), 1),
                   healthy_before=_count(raw.get("healthy_before")) or 0,
                   idle_since=idle_since if idle_since is None or idle_since >= 0 else None,
                   probe=probe,
                   changed_at=changed_at if changed_at is None or changed_at >= 0 else None,
                   rate=rate if rate is not None and rate > 0 else None,
                   decisions=kept[-KEPT_DECISIONS:])

    def text(self, limit: int = STATE_LIMIT) -> str:
        """The state as JSON within ``limit`` UTF-8 bytes: the oldest decisions go first."""
        decisions = [[when, line[:LINE_LIMIT]] for when, line in self.decisions][-KEPT_DECISIONS:]
        while True:
            text = json.dumps({**asdict(self), "decisions": decisions}, ensure_ascii=False,
                              allow_nan=False)
            if len(text.encode()) <= limit or not decisions:
                return text
            decisions = decisions[1:]


def _error_code(exc: BaseException) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


class Controller:
    """One minute's decisions. ``clients``: boto3 clients by service name."""

    def __init__(self, where: Where, clients: dict[str, Any], clock=time.time,
                 log: Callable[[str], None] = print):
        """``log``: where each decision's JSON line goes (CloudWatch Logs through stdout on
        Lambda; the simulation keeps them)."""
        self.where, self.clients, self.clock, self.log = where, clients, clock, log
        self.actions: Actions | None = None  # the last step's, for whoever runs the loop
        self.lines: list[str] = []  # the decisions of the last run()

    # -- reading -----------------------------------------------------------------------------
    def load(self) -> State:
        answer = self.clients["ssm"].get_parameter(Name=self.where.state_parameter)
        return State.parse(answer["Parameter"]["Value"])

    def save(self, state: State) -> None:
        self.clients["ssm"].put_parameter(Name=self.where.state_parameter, Type="String",
                                          Value=state.text(), Overwrite=True)

    def queue(self) -> tuple[int, int] | None:
        """Tiles waiting and in flight, or None when SQS did not give both counts."""
        attrs = self.clients["sqs"].get_queue_attributes(
            QueueUrl=self.where.queue_url, AttributeNames=[
                "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        ).get("Attributes") or {}
        try:
            visible = int(attrs["ApproximateNumberOfMessages"])
            in_flight = int(attrs["ApproximateNumberOfMessagesNotVisible"])
        except (KeyError, TypeError, ValueError):
            return None
        return (visible, in_flight) if visible >= 0 and in_flight >= 0 else None

    def healthy_targets(self) -> int:
        answer = self.clients["elbv2"].describe_target_health(TargetGroupArn=self.where.target_group)
        return sum(1 for t in answer.get("TargetHealthDescriptions", [])
                   if t.get("TargetHealth", {}).get("State") == "healthy")

    def desired_tasks(self) -> int:
        services = self.clients["ecs"].describe_services(
            cluster=self.where.cluster, services=[self.where.service]).get("services", [])
        return int(services[0]["desiredCount"]) if services else 0

    def mapping(self) -> dict:
        return self.clients["lambda"].get_event_source_mapping(UUID=self.where.mapping_id)

    def queries(self) -> list[tuple[str, str, str, list[dict], str]]:
        """(name, namespace, metric, dimensions, statistic) of everything read each minute: one
        GetMetricData call, one permission. Every metric is named with its dimensions, never
        found through ListMetrics, which shows a new metric only up to 15 minutes after it
        first appears (CloudWatch's ListMetrics reference): each new GPU host would go unseen."""
        w = self.where
        fn = [{"Name": "FunctionName", "Value": w.function_name}]
        queue = [{"Name": "QueueName", "Value": w.queue_url.rsplit("/", 1)[-1]}]
        wanted = [("calls", "AWS/Lambda", "Invocations", fn, "Sum"),
                  ("errors", "AWS/Lambda", "Errors", fn, "Sum"),
                  ("throttles", "AWS/Lambda", "Throttles", fn, "Sum"),
                  ("p95", "AWS/Lambda", "Duration", fn, "p95"),
                  ("deleted", "AWS/SQS", "NumberOfMessagesDeleted", queue, "Sum"),
                  ("records_ok", w.gpu_namespace, RECORD_METRICS[0], fn, "Sum"),
                  ("records_failed", w.gpu_namespace, RECORD_METRICS[1], fn, "Sum"),
                  # The agent aggregates the hosts' GPUs by the group's name (the template).
                  ("gpu", w.gpu_namespace, GPU_METRIC,
                   [{"Name": "AutoScalingGroupName", "Value": w.group}], "Average")]
        if w.balancer:
            lb = [{"Name": "LoadBalancer", "Value": w.balancer}]
            wanted += [("http5xx", "AWS/ApplicationELB", "HTTPCode_Target_5XX_Count", lb, "Sum"),
                       ("elb5xx", "AWS/ApplicationELB", "HTTPCode_ELB_5XX_Count", lb, "Sum")]
        return wanted

    def metrics(self, now: float) -> dict[str, list[float]]:
        """The last :data:`WINDOW` seconds, per minute. A value that is not a finite number is
        missing data, as is a metric with no value."""
        wanted = self.queries()
        queries = [{"Id": f"q{i}", "MetricStat": {
            "Metric": {"Namespace": ns, "MetricName": name, "Dimensions": dims},
            "Period": 60, "Stat": stat}} for i, (_, ns, name, dims, stat) in enumerate(wanted)]
        values: dict[str, list[float]] = {}
        start = datetime.fromtimestamp(now - WINDOW, UTC)
        end = datetime.fromtimestamp(now, UTC)
        for page in self.clients["cloudwatch"].get_paginator("get_metric_data").paginate(
                StartTime=start, EndTime=end, MetricDataQueries=queries):
            for result in page.get("MetricDataResults", []):
                key = str(result.get("Id", ""))
                if not key[1:].isdigit() or int(key[1:]) >= len(wanted):
                    continue
                finite = [v for v in map(_finite, result.get("Values") or []) if v is not None]
                if finite:
                    values.setdefault(wanted[int(key[1:])][0], []).extend(finite)
        return values

    def signals(self, now: float, visible: int, in_flight: int, healthy: int
                ) -> tuple[Signals, float | None]:
        m = self.metrics(now)
        calls = int(sum(m.get("calls", [])))
        throttles = int(sum(m.get("throttles", [])))
        # A throttled call is one that could not run: a failure, like a 5xx from the model.
        errors = int(sum(m.get("errors", [])) + sum(m.get("http5xx", [])) + sum(m.get("elb5xx", []))
                     + throttles)
        p95 = max(m["p95"]) / 1000 if m.get("p95") else None
        busy = sum(m["gpu"]) / len(m["gpu"]) if m.get("gpu") else None
        deleted = m.get("deleted", [])
        # Per reported minute: the window's newest minute is not reported yet, so dividing by
        # the whole window would understate the rate by a third.
        rate = sum(deleted) / (60 * len(deleted)) / healthy if healthy and deleted else None
        records_ok = int(sum(m["records_ok"])) if m.get("records_ok") else None
        records_failed = int(sum(m.get("records_failed", [])))
        if records_ok is None and records_failed:
            records_ok = 0
        return Signals(healthy=healthy > 0, backlog=visible, in_flight=in_flight,
                       calls=calls + throttles, model_errors=min(calls + throttles, errors),
                       p95_seconds=p95, timeout_seconds=self.where.timeout, busy_percent=busy,
                       throughput=rate, records_ok=records_ok,
                       records_failed=records_failed), rate

    # -- deciding and applying ---------------------------------------------------------------
    def run(self, budget: float = BUDGET, pushed: int = 0) -> Iterator[float]:
        """One invocation: a step, then, while work waits for a model that is starting
        (:attr:`Actions.recheck`), a look at the target group every :data:`RECHECK` seconds
        and a step as soon as a task answers, within ``budget`` seconds. Yields the seconds to
        wait before each look: the caller sleeps (Lambda) or lets simulated time pass (the
        simulation), so the loop is the same. ``pushed``: tiles `cnsq push` says it sent just
        now (SQS's counts lag); the decisions made go to :attr:`lines`."""
        start = self.clock()
        self.lines = self.step(pushed)
        while self.actions is not None and self.actions.recheck and \
                self.clock() + RECHECK - start <= budget:
            yield RECHECK
            if self.healthy_targets() > 0:
                self.lines += self.step(pushed if self.clock() - start < PUSHED_FRESH else 0)

    def step(self, pushed: int = 0) -> list[str]:
        """Read, decide, record the decision, apply it; the decisions made, as lines (also
        logged and kept). ``pushed``: tiles just sent by `cnsq push`, a floor for the backlog
        while SQS's approximate counts have yet to show them.

        The state is saved *before* anything is applied: a save that fails leaves nothing applied
        that the next minute would take for a deploy's change and revert, and the idle clock
        saved before stays as it was.
        """
        w, now = self.where, self.clock()
        state = self.load()
        lines: list[str] = []
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
        counts = self.queue()
        if counts is None:
            line = "the queue's counts are missing: nothing changed this minute"
            self.log(json.dumps({"cnsq_decision": line, "at": stamp}))
            return [line]
        visible, in_flight = counts
        visible = max(visible, pushed - in_flight)
        healthy = self.healthy_targets()
        signals, _ = self.signals(now, visible, in_flight, healthy)
        desired = self.desired_tasks()
        mapping = self.mapping()
        applied = int(mapping.get("ScalingConfig", {}).get("MaximumConcurrency") or 2)
        receiving = mapping.get("State") in ("Enabled", "Enabling", "Updating")
        memory = Memory(concurrency=state.concurrency, healthy_before=state.healthy_before,
                        idle_since=state.idle_since,
                        probe=Probe(**state.probe) if state.probe else None,
                        changed_at=state.changed_at, rate=state.rate)
        # The mapping's least maximum concurrency is 2 (Lambda's ScalingConfig).
        bounds = Bounds(low=2, high=w.max_concurrency, min_tasks=w.min_tasks,
                        max_tasks=w.max_tasks, tasks_per_instance=w.tasks_per_instance,
                        idle_seconds=w.idle_seconds, horizon_seconds=w.horizon_seconds,
                        settle_seconds=SETTLE * 60)
        memory, actions = step(memory, Observed(now, signals, healthy, desired, applied, receiving),
                               bounds)
        self.actions = actions
        tasks, concurrency, lines = actions.tasks, actions.concurrency, list(actions.lines)
        update_mapping = concurrency != applied or actions.receive != receiving
        before = state.concurrency
        state.concurrency = memory.concurrency
        state.healthy_before = memory.healthy_before
        state.idle_since = memory.idle_since
        state.probe = asdict(memory.probe) if memory.probe else None
        state.changed_at = memory.changed_at
        state.rate = memory.rate
        state.decisions = (state.decisions + [[stamp, line] for line in lines])[-KEPT_DECISIONS:]
        self.save(state)

        if tasks != desired:
            # The service's count only: the capacity provider's managed scaling sizes the group
            # (ECS: do not change the desired capacity of a group it manages).
            self.clients["ecs"].update_service(cluster=w.cluster, service=w.service,
                                               desiredCount=tasks)
        if update_mapping:
            try:
                self.clients["lambda"].update_event_source_mapping(
                    UUID=w.mapping_id, Enabled=actions.receive,
                    ScalingConfig={"MaximumConcurrency": concurrency})
            except Exception as exc:
                if _error_code(exc) != "ResourceInUseException":
                    raise
                # A deploy is updating the mapping: this minute's change waits for the next.
                skipped = ("the mapping is being updated (a deploy?): its change waits a minute")
                lines.append(skipped)
                state.concurrency = before
                state.decisions = (state.decisions + [[stamp, skipped]])[-KEPT_DECISIONS:]
                self.save(state)
        if actions.keep_hosts is not None:
            ended = self.end_idle_hosts(actions.keep_hosts)
            if ended:
                lines.append(ended)
                state.decisions = (state.decisions + [[stamp, ended]])[-KEPT_DECISIONS:]
                self.save(state)
        for line in lines:
            self.log(json.dumps({"cnsq_decision": line, "at": stamp}))
        return lines

    def end_idle_hosts(self, keep: int) -> str | None:
        """End the hosts beyond ``keep`` that run and expect no task, now: ECS's managed
        scaling would end them only after its scale-in alarm's 15 one-minute datapoints, and a
        million tiles' four hosts cost ~$0.50 in that wait. Each is drained first (no task is
        placed on it after), checked again, released from scale-in protection and terminated
        with the group's desired capacity lowered: the size ECS's scaling reaches on its own,
        so the two do not pull against each other (its metric is 100 % with no task and no
        host). A line for the log, or None when there was nothing to end."""
        w, ecs = self.where, self.clients["ecs"]
        arns = [a for page in ecs.get_paginator("list_container_instances").paginate(
            cluster=w.cluster, status="ACTIVE") for a in page.get("containerInstanceArns", [])]
        if len(arns) <= keep:
            return None
        # ECS takes at most 100 instances a DescribeContainerInstances, 10 an
        # UpdateContainerInstancesState.
        instances = [i for start in range(0, len(arns), 100)
                     for i in ecs.describe_container_instances(
                         cluster=w.cluster, containerInstances=arns[start:start + 100])[
                         "containerInstances"]]

        def empty(i: dict) -> bool:
            return not i.get("runningTasksCount") and not i.get("pendingTasksCount")

        idle = [i["containerInstanceArn"] for i in instances if empty(i)][
            :max(0, len(instances) - keep)]
        if not idle:
            return None
        drained = [i for start in range(0, len(idle), 10)
                   for i in ecs.update_container_instances_state(
                       cluster=w.cluster, containerInstances=idle[start:start + 10],
                       status="DRAINING")["containerInstances"]]
        # A task placed between the two reads keeps its host (it drains and comes back on
        # the next minute's count).
        ids = [i["ec2InstanceId"] for i in drained if empty(i) and i.get("ec2InstanceId")]
        if not ids:
            return None
        group = self.clients["autoscaling"]
        for start in range(0, len(ids), 50):  # at most 50 instances a call
            group.set_instance_protection(AutoScalingGroupName=w.group,
                                          InstanceIds=ids[start:start + 50],
                                          ProtectedFromScaleIn=False)
        for instance in ids:
            group.terminate_instance_in_auto_scaling_group(
                InstanceId=instance, ShouldDecrementDesiredCapacity=True)
        return (f"ended {len(ids)} idle host(s) ({', '.join(ids)}) now, not after ECS's "
                "15-minute scale-in")


def pushed_tiles(event: Any, now: float) -> int:
    """The tiles a `cnsq push` invocation says it sent (``{"cnsq": "pushed", "tiles": N, "at":
    epoch seconds}``), if said within :data:`PUSHED_FRESH` seconds: an event retried later (a
    throttled asynchronous invocation is retried for hours) says nothing. 0 for the schedule's
    events and anything else."""
    if not isinstance(event, dict) or event.get("cnsq") != "pushed":
        return 0
    tiles, at = _count(event.get("tiles")), _finite(event.get("at"))
    if tiles is None or at is None or not 0 <= now - at <= PUSHED_FRESH:
        return 0
    return tiles


def handler(event: dict, context: Any = None) -> dict:
    """The entry point: EventBridge's schedule every minute, and `cnsq push` as it sends."""
    import boto3

    clients = {name: boto3.client(name) for name in (
        "ssm", "sqs", "elbv2", "ecs", "lambda", "cloudwatch", "autoscaling")}
    controller = Controller(Where.from_environment(), clients)
    for wait in controller.run(pushed=pushed_tiles(event, time.time())):
        time.sleep(wait)
    return {"decisions": controller.lines}

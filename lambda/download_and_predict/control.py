"""The stack's controller: every minute, scale the model tasks and the Lambda concurrency in tandem.

A scheduled function (``ecs.minInstances`` set) that reads what ``cnsq status`` reads — the queue,
the target group's healthy targets, the worker's calls, errors and p95 duration, the load
balancer's 5xx, the GPUs' utilisation, the tiles deleted — and applies the decisions of
:mod:`download_and_predict.controller`:

- the model service's desired count (:func:`~.controller.plan_tasks`): up with the backlog, in
  whole hosts, down to the minimum after ``idleMinutes``; the autoscaling group is sized with it
  (the capacity provider would follow a minute later; its own scale-in waits 15 minutes);
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
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from .controller import (
    Capacity,
    Limits,
    Probe,
    Signals,
    backlog_per_task,
    decide,
    follow_tasks,
    plan_tasks,
)

WINDOW = 180  # seconds of metrics read each minute (CloudWatch reports a minute late)
KEPT_DECISIONS = 30


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


@dataclass
class State:
    concurrency: int | None = None
    healthy_before: int = 0
    idle_since: float | None = None
    probe: dict | None = None
    decisions: list[list] = field(default_factory=list)  # [ISO time, line]

    @classmethod
    def parse(cls, text: str) -> State:
        try:
            raw = json.loads(text)
        except ValueError:
            return cls()
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__} if isinstance(
            raw, dict) else {}
        return cls(**known)


class Controller:
    """One minute's decisions. ``clients``: boto3 clients by service name."""

    def __init__(self, where: Where, clients: dict[str, Any], clock=time.time):
        self.where, self.clients, self.clock = where, clients, clock

    # -- reading -----------------------------------------------------------------------------
    def load(self) -> State:
        answer = self.clients["ssm"].get_parameter(Name=self.where.state_parameter)
        return State.parse(answer["Parameter"]["Value"])

    def save(self, state: State) -> None:
        self.clients["ssm"].put_parameter(Name=self.where.state_parameter, Type="String",
                                          Value=json.dumps(asdict(state)), Overwrite=True)

    def queue(self) -> tuple[int, int]:
        attrs = self.clients["sqs"].get_queue_attributes(
            QueueUrl=self.where.queue_url, AttributeNames=[
                "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]), int(
            attrs["ApproximateNumberOfMessagesNotVisible"])

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

    def metrics(self, now: float) -> dict[str, list[float]]:
        """The last :data:`WINDOW` seconds, per minute: calls, errors, p95, 5xx, deletions, GPUs."""
        w = self.where
        cloudwatch = self.clients["cloudwatch"]
        fn = [{"Name": "FunctionName", "Value": w.function_name}]
        queue = [{"Name": "QueueName", "Value": w.queue_url.rsplit("/", 1)[-1]}]
        lb = [{"Name": "LoadBalancer", "Value": w.balancer}]
        wanted = [("calls", "AWS/Lambda", "Invocations", fn, "Sum"),
                  ("errors", "AWS/Lambda", "Errors", fn, "Sum"),
                  ("deleted", "AWS/SQS", "NumberOfMessagesDeleted", queue, "Sum")]
        if w.balancer:
            wanted += [("http5xx", "AWS/ApplicationELB", "HTTPCode_Target_5XX_Count", lb, "Sum"),
                       ("elb5xx", "AWS/ApplicationELB", "HTTPCode_ELB_5XX_Count", lb, "Sum")]
        gpus = []
        for page in cloudwatch.get_paginator("list_metrics").paginate(
                Namespace=w.gpu_namespace, MetricName="nvidia_smi_utilization_gpu"):
            gpus += [m for m in page.get("Metrics", [])
                     if [d["Name"] for d in m.get("Dimensions", [])] == ["InstanceId"]]
        queries = [{"Id": f"q{i}", "MetricStat": {
            "Metric": {"Namespace": ns, "MetricName": name, "Dimensions": dims},
            "Period": 60, "Stat": stat}} for i, (_, ns, name, dims, stat) in enumerate(wanted)]
        queries += [{"Id": f"g{i}", "MetricStat": {"Metric": m, "Period": 60, "Stat": "Average"}}
                    for i, m in enumerate(gpus)]
        values: dict[str, list[float]] = {}
        start = datetime.fromtimestamp(now - WINDOW, UTC)
        end = datetime.fromtimestamp(now, UTC)
        for page in cloudwatch.get_paginator("get_metric_data").paginate(
                StartTime=start, EndTime=end, MetricDataQueries=queries):
            for result in page.get("MetricDataResults", []):
                key = result["Id"]
                name = wanted[int(key[1:])][0] if key.startswith("q") else "gpu"
                values.setdefault(name, []).extend(result.get("Values", []))
        # Percentiles through GetMetricStatistics, as cnsq status reads them.
        stats = cloudwatch.get_metric_statistics(
            Namespace="AWS/Lambda", MetricName="Duration", Dimensions=fn, StartTime=start,
            EndTime=end, Period=60, ExtendedStatistics=["p95"])
        values["p95"] = [p["ExtendedStatistics"]["p95"] for p in stats.get("Datapoints", [])
                         if "p95" in p.get("ExtendedStatistics", {})]
        return values

    def signals(self, now: float, visible: int, in_flight: int, healthy: int
                ) -> tuple[Signals, float | None]:
        m = self.metrics(now)
        calls = int(sum(m.get("calls", [])))
        errors = int(sum(m.get("errors", [])) + sum(m.get("http5xx", [])) + sum(m.get("elb5xx", [])))
        p95 = max(m["p95"]) / 1000 if m.get("p95") else None
        busy = sum(m["gpu"]) / len(m["gpu"]) if m.get("gpu") else None
        deleted = sum(m.get("deleted", []))
        rate = deleted / WINDOW / healthy if healthy and m.get("deleted") else None
        return Signals(healthy=healthy > 0, backlog=visible, in_flight=in_flight, calls=calls,
                       model_errors=min(calls, errors), p95_seconds=p95,
                       timeout_seconds=self.where.timeout, busy_percent=busy,
                       throughput=rate), rate

    # -- deciding and applying ---------------------------------------------------------------
    def step(self) -> list[str]:
        """Read, decide, apply; the decisions made, as lines (also logged and kept)."""
        w, now = self.where, self.clock()
        state = self.load()
        lines: list[str] = []
        visible, in_flight = self.queue()
        healthy = self.healthy_targets()
        signals, rate = self.signals(now, visible, in_flight, healthy)
        work = visible + in_flight

        if work:
            state.idle_since = None
        elif state.idle_since is None:
            state.idle_since = now
        capacity = Capacity(
            min_tasks=w.min_tasks, max_tasks=w.max_tasks, tasks_per_instance=w.tasks_per_instance,
            idle_seconds=w.idle_seconds,
            backlog_per_task=backlog_per_task(rate, w.horizon_seconds, 1000))
        desired = self.desired_tasks()
        tasks, why = plan_tasks(work, desired, None if work else now - state.idle_since, capacity)
        if tasks != desired:
            self.clients["ecs"].update_service(cluster=w.cluster, service=w.service,
                                               desiredCount=tasks)
            hosts = math.ceil(tasks / max(1, w.tasks_per_instance))
            # Growing: the hosts with the tasks. At the minimum: the idle hosts go now, not after
            # the capacity provider's 15-minute scale-in alarm.
            if tasks > desired or not work:
                self.clients["autoscaling"].set_desired_capacity(
                    AutoScalingGroupName=w.group, DesiredCapacity=hosts, HonorCooldown=False)
            lines.append(f"model tasks {desired} → {tasks}: {why}")

        mapping = self.mapping()
        applied = int(mapping.get("ScalingConfig", {}).get("MaximumConcurrency") or 2)
        receiving = mapping.get("State") in ("Enabled", "Enabling", "Updating")
        current = state.concurrency or applied
        if state.concurrency and applied != state.concurrency:
            lines.append(f"re-applied concurrency {state.concurrency} (a deploy set {applied})")
        current = follow_tasks(current, state.healthy_before, healthy, Limits())
        probe = Probe(**state.probe) if state.probe else None
        decision = decide(signals, current, Limits(low=2, high=w.max_concurrency), probe)
        concurrency = max(2, min(w.max_concurrency, decision.concurrency))
        if concurrency != applied or decision.receive != receiving:
            self.clients["lambda"].update_event_source_mapping(
                UUID=w.mapping_id, Enabled=decision.receive,
                ScalingConfig={"MaximumConcurrency": concurrency})
        if decision.concurrency != current or decision.receive != receiving:
            lines.append(decision.line(current, receiving))
        state.concurrency = concurrency
        state.healthy_before = healthy
        state.probe = asdict(decision.probe) if decision.probe else None
        stamp = datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds")
        state.decisions = (state.decisions + [[stamp, line] for line in lines])[-KEPT_DECISIONS:]
        self.save(state)
        for line in lines:
            print(json.dumps({"cnsq_decision": line, "at": stamp}))
        return lines


def handler(event: dict, context: Any = None) -> dict:
    """The scheduled entry point (EventBridge, every minute)."""
    import boto3

    clients = {name: boto3.client(name) for name in (
        "ssm", "sqs", "elbv2", "ecs", "lambda", "cloudwatch", "autoscaling")}
    return {"decisions": Controller(Where.from_environment(), clients).step()}

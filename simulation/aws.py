"""The AWS the stack's controller talks to, simulated with AWS's semantics, so that the
simulation runs the deployed controller itself (download_and_predict.control.Controller).

What each client answers, and the AWS fact it follows:

- **CloudWatch** (``get_metric_data``): one-minute periods, each the statistic (Sum, Average,
  p95) of what was recorded in that minute. A period is reported only once it has ended and a
  minute more has passed: AWS/Lambda and AWS/SQS metrics arrive about a minute late (the Lambda
  and SQS monitoring guides), so the newest minute of a window is missing. A period with
  nothing recorded has no datapoint.
- **SQS** (``get_queue_attributes``): the approximate counts as they were about a minute ago
  ("ApproximateNumberOfMessages … approximate"; the counts settle after about a minute, the SQS
  developer guide).
- **SSM** (``get/put_parameter``): a standard parameter holds at most 4,096 characters; a longer
  value is refused (PutParameter: ValidationException).
- **Lambda** (event source mapping): ``MaximumConcurrency`` at least 2, at most 1,000; the
  pollers' ramp (at most 300 more calls a minute) is the simulation's own (World.poller_ramp).
- **ECS** (``describe_services``/``update_service``) and **ELB** (``describe_target_health``):
  the service's desired count, and the tasks the target group finds healthy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

PERIOD = 60.0
REPORT_DELAY = 60.0  # a minute's datapoint is there a minute after the minute ends
COUNT_LAG = 60.0  # SQS's approximate counts trail the queue by about this
PARAMETER_LIMIT = 4096


class ClientError(Exception):
    """What botocore raises, with the same ``response`` shape the controller reads."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.response = {"Error": {"Code": code, "Message": message}}


class Metrics:
    """What the simulated stack records, by (namespace, name), as (time, value) per minute."""

    def __init__(self) -> None:
        self.by_minute: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(
            lambda: defaultdict(list))

    def put(self, namespace: str, name: str, now: float, value: float) -> None:
        self.by_minute[(namespace, name)][int(now // PERIOD)].append(value)

    def datapoints(self, namespace: str, name: str, stat: str, start: float, end: float,
                   now: float) -> list[float]:
        """The statistic of each one-minute period in [start, end) that CloudWatch would have
        reported by ``now``, newest first (as GetMetricData's default ``TimestampDescending``)."""
        minutes = self.by_minute.get((namespace, name), {})
        first, last = math.ceil(start / PERIOD), int(end // PERIOD)
        values = []
        for minute in range(last - 1, first - 1, -1):
            if (minute + 1) * PERIOD + REPORT_DELAY > now:
                continue  # not reported yet
            recorded = minutes.get(minute)
            if recorded:
                values.append(_statistic(stat, recorded))
        return values


def _statistic(stat: str, values: list[float]) -> float:
    if stat == "Sum":
        return float(sum(values))
    if stat == "Average":
        return sum(values) / len(values)
    if stat.startswith("p"):
        ordered = sorted(values)
        rank = max(1, math.ceil(float(stat[1:]) / 100 * len(ordered)))
        return ordered[rank - 1]
    raise ClientError("InvalidParameterValue", f"statistic {stat} is not simulated")


class _Pages:
    def __init__(self, answer: Callable[..., dict]):
        self.answer = answer

    def paginate(self, **kwargs: Any) -> Iterator[dict]:
        yield self.answer(**kwargs)


class CloudWatch:
    def __init__(self, metrics: Metrics, clock: Callable[[], float]):
        self.metrics, self.clock = metrics, clock

    def get_paginator(self, operation: str) -> _Pages:
        if operation != "get_metric_data":
            raise ClientError("InvalidAction", operation)
        return _Pages(self._get_metric_data)

    def _get_metric_data(self, StartTime: datetime, EndTime: datetime,  # noqa: N803 - AWS's names
                         MetricDataQueries: list[dict]) -> dict:  # noqa: N803
        now = self.clock()
        results = []
        for query in MetricDataQueries:
            stat = query["MetricStat"]
            metric = stat["Metric"]
            values = self.metrics.datapoints(metric["Namespace"], metric["MetricName"],
                                             stat["Stat"], StartTime.timestamp(),
                                             EndTime.timestamp(), now)
            results.append({"Id": query["Id"], "Values": values})
        return {"MetricDataResults": results}


class Sqs:
    def __init__(self, counts: Callable[[], tuple[int, int]], clock: Callable[[], float]):
        self.counts, self.clock = counts, clock
        self.history: list[tuple[float, int, int]] = []

    def sample(self) -> None:
        """Called by the simulation every few seconds: what SQS will report a minute later."""
        visible, in_flight = self.counts()
        self.history.append((self.clock(), visible, in_flight))

    def get_queue_attributes(self, QueueUrl: str, AttributeNames: list[str]) -> dict:  # noqa: N803
        when = self.clock() - COUNT_LAG
        past = [h for h in self.history if h[0] <= when] or self.history[:1] or [(0.0, 0, 0)]
        _, visible, in_flight = past[-1]
        del self.history[:max(0, len(past) - 1)]  # older samples are never asked for again
        return {"Attributes": {"ApproximateNumberOfMessages": str(visible),
                               "ApproximateNumberOfMessagesNotVisible": str(in_flight)}}


class Ssm:
    def __init__(self, initial: str = "{}"):
        self.values: dict[str, str] = {}
        self.initial = initial

    def get_parameter(self, Name: str) -> dict:  # noqa: N803
        return {"Parameter": {"Name": Name, "Value": self.values.get(Name, self.initial)}}

    def put_parameter(self, Name: str, Value: str, Type: str = "String",  # noqa: N803
                      Overwrite: bool = False) -> dict:  # noqa: N803
        if len(Value) > PARAMETER_LIMIT:
            raise ClientError("ValidationException", f"the value is {len(Value)} characters, "
                              f"over a standard parameter's {PARAMETER_LIMIT}")
        self.values[Name] = Value
        return {"Version": 1}


class Mapping:
    """The event source mapping: what the simulated pollers read."""

    def __init__(self, concurrency: int, enabled: bool,
                 apply: Callable[[int, bool], None]):
        self.concurrency, self.enabled, self.apply = concurrency, enabled, apply

    def get_event_source_mapping(self, UUID: str) -> dict:  # noqa: N803
        return {"UUID": UUID, "State": "Enabled" if self.enabled else "Disabled",
                "ScalingConfig": {"MaximumConcurrency": self.concurrency}}

    def update_event_source_mapping(self, UUID: str, Enabled: bool,  # noqa: N803
                                    ScalingConfig: dict) -> dict:  # noqa: N803
        concurrency = int(ScalingConfig["MaximumConcurrency"])
        if not 2 <= concurrency <= 1000:
            raise ClientError("InvalidParameterValueException",
                              f"MaximumConcurrency {concurrency} is outside 2..1000")
        self.concurrency, self.enabled = concurrency, Enabled
        self.apply(concurrency, Enabled)
        return self.get_event_source_mapping(UUID)


class Ecs:
    """The service's desired count, and the cluster's container instances: ``hosts()`` gives
    (instance id, running tasks, draining) of each registered live host, ``drain(id)`` stops
    placement on one (UpdateContainerInstancesState)."""

    def __init__(self, desired: Callable[[], int], set_desired: Callable[[int], None],
                 hosts: Callable[[], list[tuple[str, int, bool]]] = list,
                 drain: Callable[[str], None] = lambda instance: None):
        self.desired, self.set_desired = desired, set_desired
        self.hosts, self.drain = hosts, drain

    def describe_services(self, cluster: str, services: list[str]) -> dict:
        return {"services": [{"serviceName": services[0], "desiredCount": self.desired()}]}

    def update_service(self, cluster: str, service: str, desiredCount: int) -> dict:  # noqa: N803
        self.set_desired(int(desiredCount))
        return {"service": {"serviceName": service, "desiredCount": desiredCount}}

    def get_paginator(self, operation: str) -> _Pages:
        assert operation == "list_container_instances", operation
        return _Pages(lambda cluster, status: {"containerInstanceArns": [
            f"arn:sim:container-instance/{cluster}/{i}" for i, _, draining in self.hosts()
            if (status == "DRAINING") == draining]})

    def _described(self, arns: list[str]) -> list[dict]:
        wanted = {arn.rsplit("/", 1)[-1] for arn in arns}
        return [{"containerInstanceArn": f"arn:sim:container-instance/cluster/{i}",
                 "ec2InstanceId": i, "runningTasksCount": running, "pendingTasksCount": 0,
                 "status": "DRAINING" if draining else "ACTIVE"}
                for i, running, draining in self.hosts() if i in wanted]

    def describe_container_instances(self, cluster: str,
                                     containerInstances: list[str]) -> dict:  # noqa: N803
        return {"containerInstances": self._described(containerInstances)}

    def update_container_instances_state(self, cluster: str, containerInstances: list[str],  # noqa: N803
                                         status: str) -> dict:
        for arn in containerInstances:
            self.drain(arn.rsplit("/", 1)[-1])
        return {"containerInstances": self._described(containerInstances)}


class AutoScaling:
    """The hosts' group: ``terminate(id)`` ends one host (its desired capacity follows)."""

    def __init__(self, terminate: Callable[[str], None]):
        self.terminate = terminate

    def set_instance_protection(self, AutoScalingGroupName: str, InstanceIds: list[str],  # noqa: N803
                                ProtectedFromScaleIn: bool) -> dict:  # noqa: N803
        return {}

    def terminate_instance_in_auto_scaling_group(self, InstanceId: str,  # noqa: N803
                                                 ShouldDecrementDesiredCapacity: bool) -> dict:  # noqa: N803
        self.terminate(InstanceId)
        return {"Activity": {"StatusCode": "InProgress"}}


class Elb:
    def __init__(self, healthy: Callable[[], int]):
        self.healthy = healthy

    def describe_target_health(self, TargetGroupArn: str) -> dict:  # noqa: N803
        return {"TargetHealthDescriptions": [{"TargetHealth": {"State": "healthy"}}
                                             for _ in range(self.healthy())]}

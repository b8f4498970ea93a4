"""``cnsq status``: the numbers of a running job and which of the README's four scenarios they show.

Metrics over a window: the queues (live), Lambda invocations, errors, throttles, duration p50/p95
and concurrency, the load balancer's requests, latency and 5xx, GPU utilisation per instance
(published by the CloudWatch agent the stack installs), and the results row count when the
database is reachable. Missing metrics are shown as missing, never as zero.

The diagnosis uses these thresholds (``THRESHOLDS``, the controller's: download_and_predict.scaling):

1. much higher than GPU capacity — error rate > 5 % and p95 duration ≥ 80 % of the timeout
   (Lambdas time out waiting for the model): lower the concurrency or add GPUs;
2. slightly higher — error rate ≤ 5 %, p95 duration ≥ 50 % of the timeout, GPUs ≥ 90 % busy:
   lower the concurrency a little or add a GPU;
3. lower than GPU capacity — p95 duration < 50 % of the timeout, GPUs < 90 % busy: raise the
   concurrency (by up to 2x, in proportion to the idle GPU share);
4. optimal — GPUs ≥ 90 % busy, error rate ≤ 1 %, p95 duration < 50 % of the timeout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cnsq import aws as _aws
from cnsq.aws import Client
from cnsq.egress import EGRESS_NAT
from cnsq.ops.pricing import Bill, Prices, bill, run_usage
from cnsq.results.store import open_store
from cnsq.stack import logical_ids
from cnsq.stack.logical_ids import worker_lambda
from download_and_predict.scaling import THRESHOLDS


@dataclass
class Metrics:
    window_seconds: float
    visible: int | None = None
    in_flight: int | None = None
    dead_letter: int | None = None
    rows: int | None = None
    invocations: float | None = None
    errors: float | None = None
    throttles: float | None = None
    duration_p50_ms: float | None = None
    duration_p95_ms: float | None = None
    duration_max_ms: float | None = None
    concurrency: float | None = None
    requests: float | None = None
    latency_ms: float | None = None
    http_5xx: float | None = None
    deleted: float | None = None
    gpu: dict[str, float] = field(default_factory=dict)
    duration_sum_ms: float | None = None
    hosts: int | None = None  # GPU hosts in service now
    scaling: bool = False  # the stack scales itself (ecs.minInstances)
    decisions: list[list[str]] = field(default_factory=list)  # the controller's, [time, line]
    cost: dict[str, float] = field(default_factory=dict)  # of the window, by item
    prices: str = ""

    @property
    def gpu_mean(self) -> float | None:
        return sum(self.gpu.values()) / len(self.gpu) if self.gpu else None


@dataclass
class Diagnosis:
    scenario: int  # 1-4 as in the README, 0 when it cannot be told
    title: str
    evidence: list[str]
    recommendation: str
    eta_seconds: float | None
    missing: list[str]


def diagnose(m: Metrics, timeout_s: int, concurrent: int | None,
             desired_instances: int) -> Diagnosis:
    """Which scenario the numbers show, and what to change (``lambdas.*.concurrent``,
    ``ecs.desiredInstances``)."""
    missing = [name for name, value in (
        ("Lambda invocations", m.invocations), ("Lambda errors", m.errors),
        ("Lambda duration", m.duration_p95_ms if m.duration_p95_ms is not None else m.duration_max_ms),
        ("GPU utilisation", m.gpu_mean)) if value is None]
    if m.duration_p95_ms is None and m.duration_max_ms is not None:
        missing.append("duration p95 (using the maximum)")
    rate = m.deleted / m.window_seconds if m.deleted else None
    eta = m.visible / rate if rate and m.visible is not None else None
    current = concurrent or 0
    if not m.invocations:
        waiting = m.visible or 0
        advice = (f"{waiting:,} tiles wait in the queue but nothing consumes them: check the event "
                  "source mapping and the Lambda's errors") if waiting else "nothing to do"
        return Diagnosis(0, "idle: no Lambda invocations in the window", [], advice, eta, missing)
    error_rate = (m.errors or 0) / m.invocations
    p95 = m.duration_p95_ms if m.duration_p95_ms is not None else m.duration_max_ms
    load = p95 / (timeout_s * 1000) if p95 is not None else None
    gpu = m.gpu_mean
    evidence = [f"error rate {error_rate:.1%}"]
    if load is not None and p95 is not None:
        evidence.append(f"p95 duration {p95 / 1000:.1f}s = {load:.0%} of the {timeout_s}s timeout")
    if gpu is not None:
        evidence.append(f"GPU utilisation {gpu:.0f}% (mean of {len(m.gpu)} instances)")
    t = THRESHOLDS

    if error_rate > t["errors_high"] and load is not None and load >= t["slow"]:
        lower = max(1, math.floor(current * 0.5)) if current else None
        first = (f"lower lambdas.DownloadAndPredict.concurrent to {lower}" if lower
                 else "set lambdas.DownloadAndPredict.concurrent (it is unlimited)")
        return Diagnosis(1, "Lambda concurrency is much higher than GPU prediction capacity",
                         evidence, f"{first}, or raise ecs.desiredInstances to "
                         f"{desired_instances * 2}", eta, missing)
    if gpu is None or load is None:
        return Diagnosis(0, "cannot tell: " + ", ".join(missing), evidence,
                         "GPU utilisation comes from the CloudWatch agent on the instances "
                         "(see `cnsq gpu-util` for a direct view)", eta, missing)
    if load >= t["busy_duration"] and gpu >= t["gpu_busy"]:
        lower = max(1, math.floor(current * 0.8)) if current else None
        return Diagnosis(2, "Lambda concurrency is slightly higher than GPU prediction capacity",
                         evidence, (f"lower lambdas.DownloadAndPredict.concurrent to {lower}"
                                    if lower else "lower lambdas.DownloadAndPredict.concurrent") +
                         f", or raise ecs.desiredInstances to {desired_instances + 1}", eta, missing)
    if gpu >= t["gpu_busy"] and error_rate <= t["errors_low"]:
        return Diagnosis(4, "optimal: busy GPUs, few errors, short Lambda runs", evidence,
                         "keep these settings", eta, missing)
    factor = min(2.0, t["gpu_aim"] / max(gpu, 1.0))
    higher = math.ceil(current * factor) if current else None
    fewer = max(1, math.ceil(desired_instances * gpu / t["gpu_busy"]))
    return Diagnosis(3, "Lambda concurrency is lower than GPU prediction capacity", evidence,
                     (f"raise lambdas.DownloadAndPredict.concurrent to {higher}" if higher else
                      "raise lambdas.DownloadAndPredict.concurrent") +
                     f", or lower ecs.desiredInstances to {fewer}", eta, missing)


# ---------------------------------------------------------------------------------------------
# Collection


def _metric_values(cloudwatch: Client, start: datetime, end: datetime, queries: list[dict]
                   ) -> dict[str, list[float]]:
    """Each query's values by its Id, over every page (a long window spreads one query's
    values over several pages)."""
    values: dict[str, list[float]] = {}
    for page in _aws.pages(cloudwatch, "get_metric_data", StartTime=start, EndTime=end,
                      MetricDataQueries=queries):
        for result in page.get("MetricDataResults", []):
            values.setdefault(result["Id"], []).extend(result.get("Values", []))
    return values


def _sum_or_none(values: list[float], how: str) -> float | None:
    if not values:
        return None
    return {"Sum": sum(values), "Maximum": max(values), "Average": sum(values) / len(values)}[how]


def collect(deployed: Any, since: timedelta, database_url: str | None = None) -> Metrics:
    """Read the metrics of the deployed stack (a :class:`cnsq.stack.deployed.Deployed`) over the last
    ``since``."""
    aws, config = deployed.aws, deployed.config
    now = datetime.now(UTC)
    start = now - since
    metrics = Metrics(window_seconds=since.total_seconds())
    n = config.values["stackNoDash"]
    sqs = aws.client("sqs")
    for attr, url in (("visible", deployed.queue_url), ("dead_letter", deployed.dead_letter_url)):
        if url:
            counts = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
                "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
            setattr(metrics, attr, int(counts["ApproximateNumberOfMessages"]))
            if attr == "visible":
                metrics.in_flight = int(counts["ApproximateNumberOfMessagesNotVisible"])
    lam = deployed.worker
    queries: list[tuple[str, str, str, list[dict], str]] = []
    if lam:
        dims = [{"Name": "FunctionName", "Value": lam["fullName"]}]
        queries += [("invocations", "AWS/Lambda", "Invocations", dims, "Sum"),
                    ("errors", "AWS/Lambda", "Errors", dims, "Sum"),
                    ("throttles", "AWS/Lambda", "Throttles", dims, "Sum"),
                    ("duration_max_ms", "AWS/Lambda", "Duration", dims, "Maximum"),
                    ("duration_sum_ms", "AWS/Lambda", "Duration", dims, "Sum"),
                    ("concurrency", "AWS/Lambda", "ConcurrentExecutions", dims, "Maximum")]
    queue_url = deployed.queue_url
    if queue_url:
        queries.append(("deleted", "AWS/SQS", "NumberOfMessagesDeleted",
                        [{"Name": "QueueName", "Value": queue_url.rsplit("/", 1)[-1]}], "Sum"))
    balancer = deployed.resources.get(logical_ids.load_balancer(n), ("", ""))[1]
    if "loadbalancer/" in balancer:
        dims = [{"Name": "LoadBalancer", "Value": balancer.split("loadbalancer/", 1)[1]}]
        queries += [("requests", "AWS/ApplicationELB", "RequestCount", dims, "Sum"),
                    ("latency_ms", "AWS/ApplicationELB", "TargetResponseTime", dims, "Average"),
                    ("http_5xx", "AWS/ApplicationELB", "HTTPCode_Target_5XX_Count", dims, "Sum")]
    cloudwatch = aws.client("cloudwatch")
    period = max(60, int(since.total_seconds()) // 60 * 60)
    if queries:
        answer = _metric_values(cloudwatch, start, now, [
            {"Id": f"q{i}", "MetricStat": {"Metric": {"Namespace": ns, "MetricName": name,
                                                      "Dimensions": dims},
                                           "Period": period, "Stat": stat}}
            for i, (_, ns, name, dims, stat) in enumerate(queries)])
        for key, values in answer.items():
            attr, _, _, _, stat = queries[int(key[1:])]
            value = _sum_or_none(values, stat)
            if value is not None and attr == "latency_ms":
                value *= 1000  # TargetResponseTime is in seconds
            setattr(metrics, attr, value)
    if lam:
        stats = cloudwatch.get_metric_statistics(
            Namespace="AWS/Lambda", MetricName="Duration", StartTime=start, EndTime=now,
            Period=period, Dimensions=[{"Name": "FunctionName", "Value": lam["fullName"]}],
            ExtendedStatistics=["p50", "p95"])
        points = [p.get("ExtendedStatistics", {}) for p in stats.get("Datapoints", [])]
        p50 = [p["p50"] for p in points if "p50" in p]
        p95 = [p["p95"] for p in points if "p95" in p]
        metrics.duration_p50_ms = max(p50) if p50 else None
        metrics.duration_p95_ms = max(p95) if p95 else None
    namespace = f"cnsq/{config.stack_name}"
    listed = _aws.collect(cloudwatch, "list_metrics", "Metrics", Namespace=namespace,
                     MetricName="nvidia_smi_utilization_gpu")
    gpu_queries = [m for m in listed
                   if [d["Name"] for d in m.get("Dimensions", [])] == ["InstanceId"]]
    if gpu_queries:
        answer = _metric_values(cloudwatch, start, now, [
            {"Id": f"g{i}", "MetricStat": {"Metric": m, "Period": period, "Stat": "Average"}}
            for i, m in enumerate(gpu_queries)])
        for key, values in answer.items():
            metric = gpu_queries[int(key[1:])]
            value = _sum_or_none(values, "Average")
            if value is not None:
                metrics.gpu[metric["Dimensions"][0]["Value"]] = value
    group = deployed.resources.get(logical_ids.autoscaling_group(n), ("", ""))[1]
    if group:
        groups = _aws.collect(aws.client("autoscaling"), "describe_auto_scaling_groups",
                              "AutoScalingGroups", AutoScalingGroupNames=[group])
        if groups:
            metrics.hosts = sum(1 for i in groups[0].get("Instances", [])
                                if i.get("LifecycleState") == "InService")
    metrics.scaling = config.values["ecs"]["minInstances"] is not None
    if metrics.scaling:
        metrics.decisions = _decisions(aws.client("ssm"), logical_ids.controller_state(config.stack_name))
    if database_url is None:
        # A private database: the stack's admin function counts inside the VPC.
        admin = deployed.admin
        try:
            metrics.rows = admin.call("count")["rows"] if admin else None
        except Exception:  # noqa: BLE001 - the function cannot run: shown as missing
            metrics.rows = None
    elif database_url:

        try:
            store = open_store(database_url)
            metrics.rows = store.count()
            store.close()
        except Exception:  # noqa: BLE001 - unreachable: shown as missing
            metrics.rows = None
    return metrics


def _decisions(ssm: Client, name: str) -> list[list[str]]:
    """The controller's last decisions, from its state parameter (none yet: empty)."""
    import json

    try:
        value = ssm.get_parameter(Name=name)["Parameter"]["Value"]
        return [list(d) for d in json.loads(value).get("decisions", [])]
    except Exception:  # noqa: BLE001 - no parameter yet, or not readable: shown as none
        return []


def window_cost(metrics: Metrics, values: dict, prices: Prices, tile_kb: float = 40.0,
                egress: str = EGRESS_NAT) -> Bill:
    """What the window cost, from what it measured: the hosts in service (now) over the window,
    the worker's GB-seconds and calls, the queue's requests, the NAT's hours and the tiles'
    bytes (``tile_kb`` each, estimate's default; through the NAT unless ``egress`` says
    otherwise), the database and load balancer hours, the standing parts (estimate's)."""
    from cnsq.ops.estimate import parts

    window = metrics.window_seconds
    deleted = metrics.deleted or 0.0
    calls = metrics.invocations or 0.0
    name = worker_lambda(values["lambdas"])
    memory_gb = values["lambdas"][name]["memory"] / 1024 if name else 1.0
    architecture = values["lambdas"][name]["architecture"] if name else "x86_64"
    spot = values["ecs"]["spot"] / 100  # the group's share; which host is which is not read
    usage = run_usage(window, (metrics.hosts or 0) * window * (1 - spot),
                      (metrics.duration_sum_ms or 0.0) / 1000 * memory_gb, calls,
                      deleted / 10 + 2 * calls, deleted * tile_kb / 1e6, parts(values, egress),
                      spot_instance_seconds=(metrics.hosts or 0) * window * spot)
    return bill(usage, prices, values["ecs"]["instanceType"], values["rds"]["instanceType"],
                architecture)


def as_dict(metrics: Metrics, diagnosis: Diagnosis) -> dict:
    return {"metrics": asdict(metrics), "diagnosis": asdict(diagnosis), "thresholds": THRESHOLDS}


def render(metrics: Metrics, diagnosis: Diagnosis) -> str:
    """The status screen."""
    from tabulate import tabulate

    def show(value: float | None, fmt: str = "{:,.0f}") -> str:
        return "missing" if value is None else fmt.format(value)

    rows = [
        ["tile queue", f"{show(metrics.visible)} waiting, {show(metrics.in_flight)} in flight"],
        ["dead letter queue", show(metrics.dead_letter)],
        ["results rows", show(metrics.rows)],
        ["Lambda invocations / errors / throttles",
         f"{show(metrics.invocations)} / {show(metrics.errors)} / {show(metrics.throttles)}"],
        ["Lambda duration p50 / p95 / max (s)",
         " / ".join(show(v / 1000 if v is not None else None, "{:.2f}") for v in (
             metrics.duration_p50_ms, metrics.duration_p95_ms, metrics.duration_max_ms))],
        ["Lambda concurrent executions (max)", show(metrics.concurrency)],
        ["model requests / latency (ms) / 5xx",
         f"{show(metrics.requests)} / {show(metrics.latency_ms, '{:.0f}')} / "
         f"{show(metrics.http_5xx)}"],
    ]
    if metrics.gpu:
        rows += [[f"GPU {instance}", f"{value:.0f} %"] for instance, value in sorted(metrics.gpu.items())]
    else:
        rows.append(["GPU utilisation", "missing"])
    eta = diagnosis.eta_seconds
    rows.append(["queue drains in", "unknown" if eta is None else
                 f"{int(eta // 3600)}h{int(eta % 3600 // 60):02d}m"])
    rows.append(["GPU hosts in service", show(metrics.hosts)])
    if metrics.cost:
        total = sum(metrics.cost.values())
        hosts = sum(v for k, v in metrics.cost.items() if k.startswith("GPU hosts"))
        lam = sum(v for k, v in metrics.cost.items() if k.startswith("Lambda"))
        rows.append(["cost of the window", f"${total:,.2f} (GPU hosts ${hosts:,.2f}, Lambda "
                                           f"${lam:,.2f}, the rest ${total - hosts - lam:,.2f})"])
        rows.append(["cost per million tiles (window)",
                     f"${total / metrics.deleted * 1e6:,.2f}" if metrics.deleted else
                     "no tile finished"])
    lines = [tabulate(rows, tablefmt="plain"), "",
             f"Diagnosis: {diagnosis.title}" + (f" (scenario {diagnosis.scenario})"
                                                 if diagnosis.scenario else "")]
    lines += [f"  - {item}" for item in diagnosis.evidence]
    lines.append(f"Recommendation: {diagnosis.recommendation}")
    if diagnosis.missing:
        lines.append(f"Missing: {', '.join(diagnosis.missing)}")
    if metrics.scaling:
        lines.append("This stack scales itself: its controller applies this each minute.")
        lines.append("Controller decisions (latest last):" if metrics.decisions else
                     "Controller decisions: none yet.")
        lines += [f"  {when}  {line}" for when, line in metrics.decisions[-8:]]
    if metrics.prices:
        lines.append(metrics.prices)
    return "\n".join(lines)

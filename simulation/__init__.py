"""A discrete-event simulation of the stack (SimPy), to judge the controller without AWS.

What is simulated, each part with the figure it runs on (:class:`World`, cited there):

- **SQS**: the queue holds messages (as groups of ``batchSize``, the unit a call receives); a
  received group is invisible for ``visibilityTimeout``; a failed one comes back then, and after
  ``maxReceiveCount`` receives goes to the dead letter queue.
- **The event source mapping and Lambda**: calls up to the mapping's maximum concurrency, raised by
  Lambda at most 300 per minute; a cold start when no warm environment is free; a call downloads its
  tiles in parallel (lognormal latency), posts them to the load balancer and writes the results.
  The call's prediction carries the deadline the handler gives it (the time left, less a margin), so
  a slow model fails the call before Lambda's timeout, as the real handler does.
- **The load balancer**: round robin over healthy tasks; 503 with none; 504 after its idle timeout.
- **The model (TF Serving with batching)**: each task serves one GPU batch at a time, taking every
  request waiting up to ``gpu_max_batch`` tiles; a batch costs a fixed time plus a time per tile.
  A request whose caller gave up is still computed (the GPU does not know).
- **Hosts**: a launched host boots and registers with ECS, a task pulls its image and loads the
  model, the target group sees it healthy after its checks. The capacity provider's managed scaling
  launches hosts for tasks waiting for a place (each minute), and terminates a host left without a
  task for 15 minutes (its scale-in alarm); the controller also lowers the group's size when it
  scales the tasks down to the minimum.
- **The controller** (``fixed=None``): the stack's controller itself
  (:class:`download_and_predict.control.Controller`, its own loop), invoked as each job is pushed
  (`cnsq push` does) and every minute, over simulated AWS clients (:mod:`simulation.aws`).
- **Spot**: hosts reclaimed at ``spot_interruptions_per_hour`` after a two-minute notice.

Not simulated: account limits (EC2 vCPU quotas, Lambda's account concurrency), failures of
hosts, cross-zone latency, the database's own limits (writes are a fixed time), SQS's
at-least-once duplicates, and Lambda environments expiring while idle.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

from cnsq.ops.estimate import (
    CALL_CPU_SECONDS,
    GPU_BATCH_SECONDS,
    GPU_TILE_SECONDS,
    HEALTHY_SECONDS,
    HOST_BOOT_SECONDS,
    MODEL_START_SECONDS,
    SCALE_IN_SECONDS,
    VCPU_MB,
)
from cnsq.ops.pricing import Bill, Parts, Prices, Usage, bill, run_usage
from cnsq.stack.model_batching import BATCHING
from download_and_predict.control import BUDGET, GPU_METRIC, RECORD_METRICS, Controller, Where
from simulation.aws import AutoScaling, CloudWatch, Ecs, Elb, Mapping, Metrics, Sqs, Ssm

NAMESPACE = "CNSQ"  # the agent's and the handler's metrics (the template's GpuNamespace)


@dataclass(frozen=True)
class World:
    """The figures the simulation runs on. Each says where it comes from: **[source]** a fact of
    AWS's, of TF Serving's or of this project's code (named), or **[assumption]** a figure chosen
    without a measurement of the real thing; the evaluation (:mod:`simulation.evaluation`) varies
    the assumptions the controller depends on.

    - ``tile_median_s``/``tile_sigma``: [assumption] a tile from an XYZ endpoint through a NAT,
      lognormal, median 120 ms with a long tail (sigma 0.5 puts p99 at ~0.4 s).
    - ``tile_kb``: [assumption] a 256×256 JPEG of imagery is 20–60 KB; 40 KB.
    - ``download_workers``: [source] the handler's ``DOWNLOAD_WORKERS`` default (16): a call
      downloads that many tiles at once.
    - ``cold_start_s``: a Python Lambda's init with boto3, requests and psycopg2 in a VPC at one
      vCPU: [source: ``python scripts/bench.py lambda``] the imports and boto3's clients take
      0.41 s of CPU, [assumption] plus 0.1 s of the runtime's own start: 0.5 s, stretched by the
      share of a vCPU the memory gets (0.8 s at 1024 MB, 6 s at 128 MB).
    - ``call_overhead_s``: [assumption] SQS handing a batch to Lambda.
    - ``call_cpu_s``: [source: ``python scripts/bench.py lambda``] the handler's CPU for a call of
      10 tiles at one vCPU (parsing the downloads, base64, JSON, the write): 14–17 ms (16 taken); stretched by
      the share of a vCPU the function's memory gets (one at 1,769 MB, Lambda's documentation).
    - ``db_write_s``: [assumption] one multi-row upsert of a batch into PostgreSQL in the VPC.
    - ``gpu_fixed_s``/``gpu_per_tile_s``: [assumption] one TF Serving batch on one GPU, request
      decoding included: 15 ms + 8 ms a tile (~110 tiles/s in full batches). Chosen so the
      original's example (one g4dn.xlarge, concurrency 5) costs about what its maintainers report,
      $10 per million tiles (the original README), once hosts wait and calls queue.
    - ``gpu_max_batch``/``batch_timeout_s``: [source] the batching file the stack gives TF
      Serving (:data:`cnsq.stack.model_batching.BATCHING`): a batch takes up to 64 tiles and
      waits up to 5 ms to fill.
    - ``model_failure_rate``: [source: the model] the share of prediction requests the model
      answers with an error (0 for the reference model).
    - ``host_boot_s``: [assumption] an ECS GPU AMI instance from launch to the agent's
      registration: ~3 minutes.
    - ``task_start_s``: [assumption] pulling tensorflow/serving:latest-gpu (~2.5 GB) and loading
      the model.
    - ``healthy_s``: [source] the target group's checks before the first request: the template's
      ``HealthyThresholdCount`` (3) × ``HealthCheckIntervalSeconds`` (30 s).
    - ``alb_timeout_s``: [source] the load balancer's idle timeout (ALB's default, 60 s).
    - ``poller_ramp``: [source] Lambda's SQS event source starts with five concurrent calls and
      adds at most 300 a minute (Lambda's SQS scaling documentation).
    - ``capacity_scale_in_s``: [source] ECS managed scaling ends an empty host after its scale-in
      alarm's 15 one-minute datapoints.
    - ``retries``/``retry_backoff_s``: [source] the handler's ``RETRIES`` (3 attempts) and
      ``RETRY_BACKOFF`` (0.2 s, doubling) for a 5xx or a connection error from the model.
    - ``deadline_margin_s``: [source] the handler's prediction deadline: the Lambda's time left
      less half its ``DEADLINE_RESERVE`` (5 s).
    - ``spot_interruptions_per_hour``: the chance a Spot host is reclaimed in an hour.
      [source] The Spot Instance Advisor's worst bucket is "more than 20 %" of instances
      interrupted in a month: 0.2 / 730 h ≈ 0.0003 an hour (:data:`SPOT_DOCUMENTED`);
      [assumption] a pessimistic world takes 0.5 an hour (:data:`SPOT_PESSIMISTIC`), a
      thousand times more, to show what interruptions do.
    - ``spot_notice_s``: [source] EC2's Spot interruption notice comes two minutes before the
      instance is reclaimed; ECS drains its tasks on the notice
      (``ECS_ENABLE_SPOT_INSTANCE_DRAINING``), calls queued on them at the end fail (a reset
      connection: the handler retries on another task).
    """

    tile_median_s: float = 0.12
    tile_sigma: float = 0.5
    tile_kb: float = 40.0
    download_workers: int = 16
    cold_start_s: float = 0.5
    call_overhead_s: float = 0.03
    call_cpu_s: float = CALL_CPU_SECONDS
    db_write_s: float = 0.03
    gpu_fixed_s: float = GPU_BATCH_SECONDS
    gpu_per_tile_s: float = GPU_TILE_SECONDS
    gpu_max_batch: int = BATCHING["max_batch_size"]
    batch_timeout_s: float = BATCHING["batch_timeout_micros"] / 1e6
    model_failure_rate: float = 0.0
    host_boot_s: float = HOST_BOOT_SECONDS
    task_start_s: float = MODEL_START_SECONDS
    healthy_s: float = HEALTHY_SECONDS
    alb_timeout_s: float = 60.0
    poller_ramp: int = 300
    capacity_scale_in_s: float = SCALE_IN_SECONDS
    retries: int = 3
    retry_backoff_s: float = 0.2
    deadline_margin_s: float = 2.5
    spot_interruptions_per_hour: float = 0.0
    spot_notice_s: float = 120.0


SPOT_DOCUMENTED = 0.2 / 730
SPOT_PESSIMISTIC = 0.5


@dataclass(frozen=True)
class Setup:
    """The stack's settings, as in config.yml. ``fixed``: the original's fixed size (hosts launched
    at the start, tiles pushed once they are healthy, concurrency kept); None: the controller, from
    ``min_instances`` hosts."""

    instance_type: str = "g4dn.xlarge"
    tasks_per_instance: int = 1
    min_instances: int = 0
    max_instances: int = 4
    idle_minutes: float = 2.0
    batch_size: int = 10
    lambda_timeout: float = 120.0
    lambda_memory_mb: int = 128  # the example's, as `bench.py lambda` chose it
    lambda_architecture: str = "arm64"
    visibility_timeout: float = 720.0
    max_receive_count: int = 5
    concurrency: int = 10  # the controller's start, per GPU (config.example.yml's `concurrent`)
    reserved: int = 200  # maxConcurrent, as config.example.yml suggests
    database_class: str | None = "db.t3.medium"
    fixed: int | None = None
    # A healthy host (or hosts) already running at the start, as in a stack deployed earlier.
    warm_instances: int = 0
    # False: the mapping keeps receiving with no model (what the stack did before the controller).
    pause_without_model: bool = True
    # The standing parts and the imagery's way out, as cnsq.ops.estimate.parts makes them for the
    # example config (the stack's own network, a secret token, scaling): the bill's one home.
    parts: Parts = Parts()
    spot: int = 0  # ecs.spot: the share of hosts launched as Spot, in per cent
    # False: the controller before it ended idle hosts itself (ECS's 15-minute scale-in only).
    end_idle_hosts: bool = True
    # False: the controller before `cnsq push` invoked it (its first step on the schedule's minute).
    push_kicks: bool = True


@dataclass
class Sample:
    t: float
    backlog: int
    hosts: int
    healthy: int
    concurrency: int
    receiving: bool
    gpu_percent: float | None
    scenario: int


@dataclass
class Outcome:
    tiles: int
    written: int
    dead_letter: int
    drained_at: float | None  # seconds from the start to the last tile written (or dead)
    hosts_at_minimum_after: float | None  # seconds after the drain until hosts reached the minimum
    gpu_utilisation: float  # busy share of healthy task time while there was work
    usage: Usage
    bill: Bill
    tail: Bill  # what the idle time after the drain costs (the controller's idleMinutes)
    samples: list[Sample] = field(default_factory=list)
    decisions: list[tuple[float, str]] = field(default_factory=list)
    jobs: list[tuple[float | None, float | None]] = field(default_factory=list)  # pushed, drained
    interruptions: int = 0  # Spot hosts reclaimed

    @property
    def per_million(self) -> float:
        return self.bill.per_million(self.written)


class _Task:
    def __init__(self, env, sim: _Sim, host: _Host, warm: bool = False):
        import simpy

        self.env, self.sim, self.host = env, sim, host
        self.requests: simpy.Store = simpy.Store(env)
        self.healthy = False
        self.stopped = False
        self.busy = 0.0
        env.process(self._start(0.0 if warm else sim.world.task_start_s + sim.world.healthy_s))

    def _start(self, after: float):
        yield self.env.timeout(after)
        if not self.stopped:
            self.healthy = True
            self.healthy_since = self.env.now
            self.env.process(self._serve())

    def _gather(self, batch: list, tiles: int):
        """Take the waiting requests that fit in the batch."""
        limit = self.sim.world.gpu_max_batch
        while self.requests.items and tiles + self.requests.items[0][0] <= limit:
            item = yield self.requests.get()
            batch.append(item)
            tiles += item[0]
        return tiles

    def _serve(self):
        w = self.sim.world
        # A stopped task (scale-in, a Spot notice) is deregistered: it gets no new request and
        # answers those it has (the target group's deregistration delay).
        while not self.stopped or self.requests.items:
            first = yield self.requests.get()
            batch, tiles = [first], first[0]
            tiles = yield from self._gather(batch, tiles)
            if not self.requests.items and tiles < w.gpu_max_batch and w.batch_timeout_s > 0:
                # TF Serving waits up to batch_timeout_micros for a batch that is not full
                yield self.env.timeout(w.batch_timeout_s)
                tiles = yield from self._gather(batch, tiles)
            service = w.gpu_fixed_s + w.gpu_per_tile_s * tiles
            yield self.env.timeout(service)
            self.busy += service
            gone = self.host.terminated  # reclaimed mid-batch: the connection is reset
            for _, done in batch:
                if not done.triggered:
                    done.succeed(not gone)


class _Host:
    def __init__(self, env, sim: _Sim, ready_at: float, warm: bool = False):
        self.env, self.sim = env, sim
        self.launched = env.now
        self.registered = warm
        self.tasks: list[_Task] = []
        self.empty_since = env.now
        self.terminated = False
        self.stopped_at: float | None = None
        self.spot = False
        self.draining = False  # a Spot interruption notice came, or the controller drained it
        self.id = f"i-{len(sim.hosts):04d}"
        env.process(self._boot(ready_at))

    def _boot(self, ready_at):
        if self.registered:
            return
        yield self.env.timeout(ready_at)
        self.registered = True
        self.sim.place_tasks()


class _Sim:
    def __init__(self, setup: Setup, world: World, jobs: Sequence[int], seed: int, prices: Prices,
                 gap_s: float):
        import simpy

        self.setup, self.world, self.prices = setup, world, prices
        self.env = simpy.Environment()
        self.rng = random.Random(seed)
        self.jobs, self.gap_s = list(jobs), gap_s
        self.tiles = sum(self.jobs)
        # Per job: when its tiles were pushed, how many are settled (written or dead), when the
        # last one was.
        self.job_pushed: list[float | None] = [None] * len(self.jobs)
        self.job_settled = [0] * len(self.jobs)
        self.job_drained: list[float | None] = [None] * len(self.jobs)
        # A group of messages as a call receives them: [tiles, receives, job, its number].
        self.visible: deque[list[int]] = deque()
        self.visible_tiles = 0
        self.groups = 0
        self.seed = seed
        self.invisible_tiles = 0
        self.written = 0
        self.dead = 0
        self.usage = Usage()
        self.hosts: list[_Host] = []
        self.desired_tasks = 0
        # The controller's stack starts with the mapping disabled (no model yet), unless hosts
        # are up; a fixed stack's tiles arrive once the deploy is done.
        self.receiving = setup.fixed is None and (bool(setup.warm_instances) or
                                                  not setup.pause_without_model)
        self.concurrency = setup.concurrency
        self.allowed = min(setup.concurrency, 5)  # Lambda's pollers start small
        self.running = 0
        self.warm = 0
        self.rr = 0
        # What CloudWatch and SQS will report to the controller (simulation.aws).
        self.metrics = Metrics()
        self.sqs_client = Sqs(lambda: (self.backlog, self.invisible_tiles), lambda: self.env.now)
        self.samples: list[Sample] = []
        self.decisions: list[tuple[float, str]] = []
        self.drained_at: float | None = None
        self.at_minimum_at: float | None = None
        self.work_time_busy = 0.0
        self.work_time_total = 0.0
        self.scenario = 0
        self.sqs_requests = sum(math.ceil(t / 10) for t in self.jobs)  # SendMessageBatch: 10
        self.pushed = False
        self.unpushed = self.tiles
        self._normal = NormalDist()
        self.interruptions = 0
        self.launched = 0
        # `cnsq push` invoking the controller as it sends (set by :meth:`controller`).
        self.kick: Callable[[int], object] | None = None

    # -- SQS ---------------------------------------------------------------------------------
    def push(self, job: int = 0):
        tiles, size = self.jobs[job], self.setup.batch_size
        full, rest = divmod(tiles, size)
        first = self.groups
        self.visible.extend([size, 0, job, first + i] for i in range(full))
        if rest:
            self.visible.append([rest, 0, job, first + full])
        self.groups += full + (1 if rest else 0)
        self.visible_tiles += tiles
        self.unpushed -= tiles
        self.job_pushed[job] = self.env.now
        self.pushed = True
        if self.kick is not None:
            self.kick(tiles)

    def _push_later(self, job: int):
        yield self.env.timeout(self.gap_s)
        self.push(job)

    @property
    def backlog(self) -> int:
        return self.visible_tiles

    def _settle(self, group: list[int]) -> None:
        """``group``'s tiles are written or dead: its job may be drained, the next one follows
        ``gap_s`` later."""
        job = group[2]
        self.job_settled[job] += group[0]
        if self.job_settled[job] >= self.jobs[job] and self.job_drained[job] is None:
            self.job_drained[job] = self.env.now
            if job + 1 < len(self.jobs):
                self.env.process(self._push_later(job + 1))
            elif all(t is not None for t in self.job_drained):
                self.drained_at = self.env.now

    def _return_later(self, group: list[int]):
        yield self.env.timeout(self.setup.visibility_timeout)
        self.invisible_tiles -= group[0]
        if group[1] >= self.setup.max_receive_count:
            self.dead += group[0]
            self._settle(group)
        else:
            self.visible.append(group)
            self.visible_tiles += group[0]

    # -- Lambda ------------------------------------------------------------------------------
    def poller(self):
        while True:
            limit = min(self.concurrency, self.setup.reserved, self.allowed)
            while self.receiving and self.visible and self.running < limit:
                group = self.visible.popleft()
                self.visible_tiles -= group[0]
                group[1] += 1
                self.invisible_tiles += group[0]
                self.running += 1
                self.sqs_requests += 1  # the receive (the delete is counted when it succeeds)
                self.env.process(self.call(group))
            yield self.env.timeout(0.2)

    def ramp(self):
        while True:
            yield self.env.timeout(60)
            self.allowed = min(1000, self.allowed + self.world.poller_ramp)

    def call(self, group: list[int]):
        w, s = self.world, self.setup
        start = self.env.now
        took = w.call_overhead_s + w.call_cpu_s * VCPU_MB / min(s.lambda_memory_mb, VCPU_MB)
        if self.warm > 0:
            self.warm -= 1
        else:
            took += w.cold_start_s * VCPU_MB / min(s.lambda_memory_mb, VCPU_MB)
        n = group[0]
        yield self.env.timeout(took + self.download_time(n))  # one event: nothing between them
        ok = yield from self.predict(n, start, group)
        if ok:
            yield self.env.timeout(w.db_write_s)
        duration = self.env.now - start
        # The handler's metrics: the call (AWS/Lambda), and its records as embedded-metric lines.
        # A record the model failed is a batch item failure: the call itself succeeds.
        fn = self.metrics.put
        fn("AWS/Lambda", "Invocations", self.env.now, 1)
        fn("AWS/Lambda", "Duration", self.env.now, duration * 1000)
        fn(NAMESPACE, RECORD_METRICS[0] if ok else RECORD_METRICS[1], self.env.now, n)
        if ok:
            fn("AWS/SQS", "NumberOfMessagesDeleted", self.env.now, n)
        self.usage.lambda_requests += 1
        self.usage.lambda_gb_seconds += duration * s.lambda_memory_mb / 1024
        self.usage.nat_gb += n * w.tile_kb / 1e6
        self.running -= 1
        self.warm += 1
        if ok:
            self.invisible_tiles -= n
            self.written += n
            self.sqs_requests += 1  # DeleteMessageBatch
            self._settle(group)
        else:
            self.env.process(self._return_later(group))

    def download_time(self, n: int) -> float:
        """``n`` tiles fetched by ``download_workers`` threads: the time until the last arrives."""
        w = self.world
        mu = math.log(w.tile_median_s)
        if n <= w.download_workers:
            # The slowest of n lognormal downloads, drawn at once: its CDF is F(x)^n, so
            # F^-1(U^(1/n)) has its distribution (one draw where n would cost n).
            p = min(max(self.rng.random() ** (1.0 / n), 1e-12), 1.0 - 1e-12)
            return math.exp(mu + w.tile_sigma * self._normal.inv_cdf(p))
        free = [0.0] * w.download_workers
        for _ in range(n):
            heapq.heappush(free, heapq.heappop(free) + self.rng.lognormvariate(mu, w.tile_sigma))
        return max(free)

    def model_fails(self, group: list[int], attempt: int) -> bool:
        """Whether the model answers this group's ``attempt`` (of its current receive) with an
        error: drawn from the group's identity, not the run's random stream, so that every setup
        compared in a world meets the same failures (common random numbers)."""
        rate = self.world.model_failure_rate
        if not rate:
            return False
        return random.Random(f"{self.seed}:{group[3]}:{group[1]}:{attempt}").random() < rate

    def predict(self, n: int, start: float, group: list[int]):
        """The handler's prediction request: retried after a 5xx (503 without a healthy target,
        504 past the load balancer's idle timeout, the model's own errors) while time is left;
        abandoned at the handler's deadline."""
        w, s = self.world, self.setup
        for attempt in range(w.retries):
            if attempt:
                yield self.env.timeout(w.retry_backoff_s * 2 ** (attempt - 1))
            left = s.lambda_timeout - (self.env.now - start) - w.deadline_margin_s
            if left <= 0:
                return False
            healthy = [t for t in self.tasks() if t.healthy and not t.stopped]
            if not healthy:
                yield self.env.timeout(0.005)
                continue  # 503: no target
            self.rr = (self.rr + 1) % len(healthy)
            task = healthy[self.rr]
            done = self.env.event()
            task.requests.put((n, done))
            result = yield done | self.env.timeout(max(0.0, min(left, w.alb_timeout_s)))
            if done not in result:
                if left <= w.alb_timeout_s:
                    return False  # the handler's deadline: no retry
                continue  # 504 from the load balancer
            if done.value is False:
                continue  # 502: the host went away (a Spot interruption) with the request
            if not self.model_fails(group, attempt):
                return True
        return False

    # -- hosts and tasks ---------------------------------------------------------------------
    def live_hosts(self) -> list[_Host]:
        return [h for h in self.hosts if not h.terminated]

    def tasks(self) -> list[_Task]:
        return [t for h in self.live_hosts() for t in h.tasks if not t.stopped]

    def serving_hosts(self) -> list[_Host]:
        """Live hosts without an interruption notice: where tasks are placed, what the capacity
        provider counts (a draining host's tasks are replaced elsewhere at once)."""
        return [h for h in self.live_hosts() if not h.draining]

    def launch(self, count: int, warm: bool = False):
        """``warm``: hosts and tasks already running (a stack deployed earlier). A mixed
        group keeps ``100 - spot`` % of its hosts on demand, the rest Spot."""
        for _ in range(count):
            host = _Host(self.env, self, self.world.host_boot_s, warm)
            serving = self.serving_hosts()
            on_demand = sum(not h.spot for h in serving)
            host.spot = on_demand >= math.ceil((len(serving) + 1) * (100 - self.setup.spot) / 100)
            self.hosts.append(host)
            self.launched += 1
            if host.spot and self.world.spot_interruptions_per_hour > 0:
                self.env.process(self._interruption(host, self.launched))
            if warm:
                host.tasks.extend(_Task(self.env, self, host, warm=True)
                                  for _ in range(self.setup.tasks_per_instance))

    def _interruption(self, host: _Host, number: int):
        """A Spot host's reclaim: exponential with the world's rate, drawn from the host's
        number (every setup compared meets the same); the notice drains its tasks, the host
        goes ``spot_notice_s`` later."""
        w = self.world
        draw = random.Random(f"{self.seed}:spot:{number}").expovariate(
            w.spot_interruptions_per_hour / 3600)
        yield self.env.timeout(draw)
        if host.terminated:
            return
        self.interruptions += 1
        host.draining = True
        for task in host.tasks:
            task.stopped = True
            task.healthy = False
        host.empty_since = self.env.now
        self.place_tasks()
        if self.setup.fixed is not None:
            self.launch(1)  # a fixed group's desired capacity: the group replaces the host
        yield self.env.timeout(w.spot_notice_s)
        if not host.terminated:
            self.terminate(host)
            self.place_tasks()

    def place_tasks(self):
        per = self.setup.tasks_per_instance
        while len(self.tasks()) < self.desired_tasks:
            room = [h for h in self.serving_hosts() if h.registered and len(
                [t for t in h.tasks if not t.stopped]) < per]
            if not room:
                return
            host = room[0]
            host.tasks.append(_Task(self.env, self, host))
        extra = len(self.tasks()) - self.desired_tasks
        for task in sorted(self.tasks(), key=lambda t: t.healthy)[:max(0, extra)]:
            task.stopped = True
            task.host.empty_since = self.env.now

    def capacity_provider(self):
        """Managed scaling: hosts for tasks waiting for a place; an empty host ends after 15 min."""
        per = self.setup.tasks_per_instance
        while True:
            yield self.env.timeout(60)
            needed = min(self.setup.max_instances, math.ceil(self.desired_tasks / per))
            live = self.serving_hosts()
            if needed > len(live):
                self.launch(needed - len(live))
            for host in live:
                if any(not t.stopped for t in host.tasks):
                    host.empty_since = self.env.now
                elif self.env.now - host.empty_since >= self.world.capacity_scale_in_s:
                    self.terminate(host)
            self.place_tasks()

    def terminate(self, host: _Host):
        host.terminated = True
        host.stopped_at = self.env.now
        for task in host.tasks:
            task.stopped = True
            task.healthy = False
            while task.requests.items:  # queued on a host that is gone: a reset connection
                _, done = task.requests.items.pop()
                if not done.triggered:
                    done.succeed(False)

    def container_instances(self) -> list[tuple[str, int, bool]]:
        """ECS's view of the hosts: the registered live ones, their tasks, whether draining."""
        if not self.setup.end_idle_hosts:
            return []
        return [(h.id, sum(not t.stopped for t in h.tasks), h.draining)
                for h in self.live_hosts() if h.registered]

    def drain_host(self, instance: str) -> None:
        for host in self.live_hosts():
            if host.id == instance:
                host.draining = True

    def end_host(self, instance: str) -> None:
        for host in self.live_hosts():
            if host.id == instance:
                self.terminate(host)

    # -- the stack's controller (or the fixed setup's user) ------------------------------------
    def fixed_start(self):
        s = self.setup
        self.desired_tasks = s.fixed * s.tasks_per_instance
        self.launch(s.fixed)
        while not self.tasks() or not all(t.healthy for t in self.tasks()) or \
                len(self.tasks()) < self.desired_tasks:
            yield self.env.timeout(1)
        self.push()  # the deploy has ended: the user pushes the first job's tiles
        self.receiving = True

    def set_desired_tasks(self, tasks: int) -> None:
        """ECS's UpdateService: the scheduler places what fits now; the capacity provider
        launches hosts for the rest and ends empty ones (:meth:`capacity_provider`)."""
        self.desired_tasks = tasks
        self.place_tasks()

    def apply_mapping(self, concurrency: int, enabled: bool) -> None:
        self.concurrency = concurrency
        self.receiving = enabled or not self.setup.pause_without_model

    def controller(self):
        """The stack's controller itself (download_and_predict.control.Controller), every
        minute and as each job is pushed, against simulated AWS clients with AWS's semantics
        (simulation.aws), run by its own loop (:meth:`Controller.run`)."""
        import simpy

        s, w = self.setup, self.world
        clock = lambda: self.env.now  # noqa: E731
        where = Where(
            queue_url="https://sqs.simulated/000000000000/tiles", function_name="worker",
            mapping_id="mapping", cluster="cluster", service="model", group="gpu-hosts",
            target_group="targets", gpu_namespace=NAMESPACE, state_parameter="/cnsq/sim/controller",
            balancer="", timeout=s.lambda_timeout, min_tasks=s.min_instances * s.tasks_per_instance,
            max_tasks=s.max_instances * s.tasks_per_instance, tasks_per_instance=s.tasks_per_instance,
            idle_seconds=s.idle_minutes * 60, max_concurrency=min(1000, s.reserved),
            horizon_seconds=2 * (w.host_boot_s + w.task_start_s + w.healthy_s))
        self.mapping = Mapping(max(2, self.concurrency), self.receiving, self.apply_mapping)
        clients = {"ssm": Ssm(), "sqs": self.sqs_client, "lambda": self.mapping,
                   "elbv2": Elb(lambda: sum(1 for t in self.tasks() if t.healthy)),
                   "ecs": Ecs(lambda: self.desired_tasks, self.set_desired_tasks,
                              self.container_instances, self.drain_host),
                   "cloudwatch": CloudWatch(self.metrics, clock),
                   "autoscaling": AutoScaling(self.end_host)}
        controller = Controller(where, clients, clock=clock,
                                log=lambda line: self.decisions.append(
                                    (self.env.now, json.loads(line)["cnsq_decision"])))
        # The function's ReservedConcurrentExecutions is 1: an invocation while one runs waits
        # (Lambda retries a throttled asynchronous event).
        turn = simpy.Resource(self.env, capacity=1)

        def invoke(pushed: int = 0):
            with turn.request() as mine:
                yield mine
                for wait in controller.run(BUDGET, pushed=pushed):
                    yield self.env.timeout(wait)
                if controller.actions is not None:
                    self.scenario = controller.actions.scenario

        if s.push_kicks:
            self.kick = lambda tiles: self.env.process(invoke(tiles))
            if self.pushed:  # the first job was pushed as the stack came up
                self.kick(self.jobs[0])
        while True:
            yield self.env.timeout(60)  # EventBridge's schedule, at the worst phase
            self.env.process(invoke())

    def observer(self):
        """Every 10 s: GPU use while there is work; every minute a sample for the plot."""
        seen: dict[int, float] = {}
        minute: dict[int, float] = {}
        while True:
            yield self.env.timeout(10)
            self.sqs_client.sample()
            healthy = [t for t in self.tasks() if t.healthy]
            work = self.pushed and (self.backlog or self.invisible_tiles)
            for t in healthy:
                before = seen.get(id(t))
                if work and before is not None:
                    self.work_time_busy += t.busy - before
                    self.work_time_total += 10.0
                seen[id(t)] = t.busy
            if int(self.env.now) % 60 == 0:
                gpu = None
                if healthy:
                    # A task first seen this minute has been busy since it started (from 0).
                    gpu = 100.0 * sum(min(1.0, (t.busy - minute.get(id(t), 0.0)) / 60.0)
                                      for t in healthy) / len(healthy)
                minute = {id(t): t.busy for t in healthy}
                if gpu is not None:  # the agent's datapoint for the minute that just ended
                    self.metrics.put(NAMESPACE, GPU_METRIC, self.env.now - 1, gpu)
                waiting = self.backlog + self.invisible_tiles + self.unpushed
                self.samples.append(Sample(
                    self.env.now, waiting, len(self.live_hosts()),
                    len(healthy), self.concurrency, self.receiving, gpu, self.scenario))
            minimum = self.setup.min_instances if self.setup.fixed is None else 0
            if self.drained_at is not None and self.at_minimum_at is None and \
                    len(self.live_hosts()) <= minimum:
                self.at_minimum_at = self.env.now


def simulate(setup: Setup, tiles: int | Sequence[int], prices: Prices, world: World = World(),
             seed: int = 1, horizon_s: float = 48 * 3600, gap_s: float = 2 * 3600) -> Outcome:
    """Run ``tiles`` through the simulated stack: a job of that many tiles, or several jobs, each
    pushed ``gap_s`` after the one before it is drained (a fixed stack stays up between them).
    The bill counts until the last tile is settled, ``tail`` what the hosts cost after that until
    they reach the minimum (the controller's ``idleMinutes``; a fixed stack's hosts are counted
    as deleted at once, the best case)."""
    jobs = [tiles] if isinstance(tiles, int) else list(tiles)
    sim = _Sim(setup, world, jobs, seed, prices, gap_s)
    env = sim.env
    env.process(sim.poller())
    env.process(sim.ramp())
    env.process(sim.observer())
    if setup.fixed is not None:
        env.process(sim.fixed_start())
        env.process(_fixed_end(sim))
    else:
        sim.push()
        if setup.warm_instances:
            sim.desired_tasks = setup.warm_instances * setup.tasks_per_instance
            sim.launch(setup.warm_instances, warm=True)
        env.process(sim.capacity_provider())
        env.process(sim.controller())
    env.run(until=env.timeout(0))
    while env.now < horizon_s:
        env.run(until=env.now + 60)
        done = sim.drained_at is not None
        if done and (setup.fixed is not None or sim.at_minimum_at is not None):
            break
    drained = sim.drained_at
    end = drained if drained is not None else env.now
    usage = _usage_until(sim, end)
    total = bill(usage, prices, setup.instance_type, setup.database_class,
                 setup.lambda_architecture)
    tail_usage = Usage(
        instance_seconds=_host_seconds(sim, env.now, False) - usage.instance_seconds,
        spot_instance_seconds=_host_seconds(sim, env.now, True) - usage.spot_instance_seconds)
    return Outcome(
        tiles=sim.tiles, written=sim.written, dead_letter=sim.dead, drained_at=drained,
        hosts_at_minimum_after=(sim.at_minimum_at - drained) if (
            drained is not None and sim.at_minimum_at is not None) else None,
        gpu_utilisation=(sim.work_time_busy / sim.work_time_total) if sim.work_time_total else 0.0,
        usage=usage, bill=total,
        tail=bill(tail_usage, prices, setup.instance_type, None),
        samples=sim.samples, decisions=sim.decisions,
        jobs=list(zip(sim.job_pushed, sim.job_drained, strict=True)),
        interruptions=sim.interruptions)


def _fixed_end(sim: _Sim):
    while sim.drained_at is None:
        yield sim.env.timeout(10)
    for host in sim.live_hosts():
        sim.terminate(host)  # the user deletes the stack as the last tile is written


def _host_seconds(sim: _Sim, end: float, spot: bool | None = None) -> float:
    """Host time up to ``end``: from launch to termination (or ``end``); ``spot`` True or
    False: of those hosts only."""
    return sum(max(0.0, min(end, h.stopped_at if h.stopped_at is not None else end) - h.launched)
               for h in sim.hosts if spot is None or h.spot == spot)


def _usage_until(sim: _Sim, end: float) -> Usage:
    """The run's usage up to ``end``."""
    u = sim.usage
    return run_usage(end, _host_seconds(sim, end, False), u.lambda_gb_seconds, u.lambda_requests,
                     sim.sqs_requests, u.nat_gb, sim.setup.parts,
                     spot_instance_seconds=_host_seconds(sim, end, True))

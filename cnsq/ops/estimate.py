"""``cnsq estimate``: the time and the cost of N tiles for a config, item by item.

The figures a run depends on that the config does not hold (:class:`PerTile`) have documented
defaults — the ones the simulation runs on (:class:`simulation.World`) — and options to give
measured ones. The arithmetic of the bill is :func:`cnsq.ops.pricing.bill`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cnsq import egress
from cnsq.config import raster_imagery
from cnsq.egress import EGRESS_NAT
from cnsq.ops.pricing import Bill, Parts, Prices, Usage, bill, run_usage

# A GPU host's start, in the figures the simulation runs on too (simulation.World reads them
# here: one home). Boot and registration, and the model's image pull and load, are assumptions
# (the ECS GPU AMI; tensorflow/serving:latest-gpu is ~2.5 GB); the health checks are the
# template's target group: 3 healthy checks 30 s apart.
HOST_BOOT_SECONDS = 180.0
MODEL_START_SECONDS = 90.0
HEALTHY_SECONDS = 3 * 30.0
HOST_START_SECONDS = HOST_BOOT_SECONDS + MODEL_START_SECONDS + HEALTHY_SECONDS
# ECS's managed scaling ends an emptied host when its scale-in alarm has seen 15 one-minute
# datapoints: a stack that scales itself pays its hosts that long after idleMinutes.
SCALE_IN_SECONDS = 15 * 60.0
# Lambda allocates CPU in proportion to memory: at 1,769 MB a function has the equivalent of one
# vCPU (Lambda's "Configure Lambda function memory"). Below it, the handler's CPU time stretches.
VCPU_MB = 1769
# One TF Serving batch on one GPU, request decoding included: 15 ms + 8 ms a tile, up to 64 tiles
# (the batching file's max_batch_size): ~121 tiles/s in full batches. An assumption, chosen so the
# original's example costs about what its maintainers report (simulation.World says more).
GPU_BATCH_SECONDS = 0.015
GPU_TILE_SECONDS = 0.008
FULL_BATCH = 64
# Idle at its minimum the controller ends the hosts without a task at its next minute.
CONTROLLER_SECONDS = 60.0
# The worker's CPU for a call of 10 tiles at one vCPU (`python scripts/bench.py lambda`: parsing
# the downloads, base64, JSON, the write; 14–17 ms in three runs on the 2-core VM of docs/performance.md).
CALL_CPU_SECONDS = 0.016
# A tile the worker reads from COG or STAC imagery itself (imagery.cog, imagery.stac): a block's
# inflate, the reprojection and the PNG, at one vCPU (`python scripts/bench.py cog`, 11 ms on
# the 2-core VM of docs/performance.md, 2026-12-07).
RASTER_TILE_CPU_SECONDS = 0.011


@dataclass(frozen=True)
class PerTile:
    """``tiles_per_second``: one model task's rate (one GPU) with full TF Serving batches;
    ``call_seconds``: what one worker call (``batchSize`` tiles) waits for — the downloads, the
    model's queue and answer, the write — besides its own CPU (:data:`CALL_CPU_SECONDS`, added by
    the memory's share of a vCPU); 1.2 s is the simulation's reference job's mean;
    ``tile_kb``: one image's size, as it comes through the NAT gateway."""

    tiles_per_second: float = round(FULL_BATCH / (GPU_BATCH_SECONDS + GPU_TILE_SECONDS * FULL_BATCH))
    call_seconds: float = 1.2
    tile_kb: float = 40.0


def parts(values: dict, egress: str = EGRESS_NAT) -> Parts:
    """The stack's standing parts for the config ``values`` (validated), the imagery leaving by
    ``egress``: the NAT's address when the stack creates the network, the database's storage,
    a secret per secret env and the database's password (RDS keeps it in Secrets Manager), the
    controller's metrics when the stack scales itself (its GetMetricData reads 8, and 2 of the
    load balancer's)."""
    from cnsq.config import Secret

    secrets = sum(isinstance(v, Secret) for spec in values["lambdas"].values()
                  for v in spec["envs"].values())
    scaling = values["ecs"]["minInstances"] is not None
    return Parts(egress=egress, public_ipv4=0 if values["vpc"] else 1,
                 storage_gb=float(values["rds"]["storage"]), secrets=secrets + 1,
                 controller_metrics=10 if scaling else 0)


def imagery_way(values: dict, region: str, choice: str = "auto",
                resolve: egress.Resolver = egress.families) -> tuple[str, str]:
    """The imagery's way out (``choice``, or with ``auto`` what the config's TILE_ENDPOINT
    resolves to) and a note saying why."""
    if choice != "auto":
        return choice, f"imagery: counted as leaving by {WAYS[choice]} (--egress {choice})"
    found = egress.for_config(values, region, resolve)
    if found is None:
        return egress.EGRESS_NAT, ("imagery: no TILE_ENDPOINT in the clear; counted through the "
                                   "NAT gateway")
    return found[1].way, f"imagery: {found[1].why}"


WAYS = {egress.EGRESS_NAT: "the NAT gateway", egress.EGRESS_IPV6:
        "the egress-only internet gateway (IPv6)", egress.EGRESS_S3: "the S3 gateway endpoint"}


@dataclass(frozen=True)
class Estimate:
    tiles: int
    hosts: int
    tasks: int
    seconds: float  # from the push to the last tile (hosts starting included)
    bill: Bill
    idle: Bill  # a scaling stack's hosts after the work: idleMinutes, then ECS's scale-in
    # (not in ``bill``)
    standing_per_day: float  # NAT gateway, database and load balancer, while the stack exists
    notes: list[str]

    @property
    def per_million(self) -> float:
        return self.bill.per_million(self.tiles)


def estimate(tiles: int, values: dict, prices: Prices, per: PerTile = PerTile(),
             worker: str | None = None, egress: str = EGRESS_NAT) -> Estimate:
    """The estimate for ``tiles`` with the config ``values`` (validated) at ``prices``.

    The hosts are ``ecs.maxInstances`` when the stack scales itself (the controller takes it to
    the maximum for any backlog worth a host), else ``ecs.desiredInstances``; each runs
    ``tasksPerInstance`` tasks. The drain is the tiles over the tasks' rate, plus a host's start.
    """
    if tiles < 1:
        raise ValueError("the number of tiles must be 1 or more")
    ecs, sqs = values["ecs"], values["sqs"]
    scaling = ecs["minInstances"] is not None
    hosts = ecs["maxInstances"] if scaling else ecs["desiredInstances"]
    if hosts < 1:
        raise ValueError("no GPU host: ecs.maxInstances (or desiredInstances) is 0")
    tasks = hosts * ecs["tasksPerInstance"]
    work = tiles / (tasks * per.tiles_per_second)
    seconds = work + HOST_START_SECONDS
    lambdas = values["lambdas"]
    name = worker or next((n for n, spec in lambdas.items() if spec.get("queueTrigger")),
                          next(iter(lambdas)))
    memory_gb = lambdas[name]["memory"] / 1024
    raster = raster_imagery(values)
    cpu = CALL_CPU_SECONDS + (sqs["batchSize"] * RASTER_TILE_CPU_SECONDS if raster else 0.0)
    call = per.call_seconds + cpu * VCPU_MB / min(lambdas[name]["memory"], VCPU_MB)
    calls = math.ceil(tiles / sqs["batchSize"])
    # SendMessageBatch (10 a request), a receive and a delete per call.
    stack = parts(values, egress)
    spot = ecs["spot"] / 100
    usage = run_usage(seconds, hosts * seconds * (1 - spot),
                      calls * call * memory_gb, calls,
                      math.ceil(tiles / 10) + 2 * calls, tiles * per.tile_kb / 1e6, stack,
                      spot_instance_seconds=hosts * seconds * spot)
    database = values["rds"]["instanceType"]
    total = bill(usage, prices, ecs["instanceType"], database, lambdas[name]["architecture"])
    idle_seconds = ecs["idleMinutes"] * 60 + CONTROLLER_SECONDS if scaling else 0
    idle = bill(Usage(instance_seconds=hosts * idle_seconds * (1 - spot),
                      spot_instance_seconds=hosts * idle_seconds * spot), prices,
                ecs["instanceType"], None)
    day = 86400.0
    # Standing: a day of the stack with no work (the controller still reads its metrics each
    # minute when the stack scales itself).
    standing = bill(run_usage(day, 0.0, 0.0, 0, 0, 0.0, Parts(
        egress, stack.public_ipv4, stack.storage_gb, stack.secrets, 0, 0,
        stack.controller_metrics)), prices, ecs["instanceType"], database)
    notes = [f"{hosts} host(s) × {ecs['tasksPerInstance']} model task(s), "
             f"{per.tiles_per_second:g} tiles/s per task, {call:.2f} s per call of "
             f"{sqs['batchSize']} tiles ({per.call_seconds:g} s waiting, the rest CPU at "
             f"{lambdas[name]['memory']} MB), {per.tile_kb:g} KB per tile"]
    if raster:
        notes.append(f"COG/STAC imagery: the worker reads each tile itself, "
                     f"{RASTER_TILE_CPU_SECONDS * 1000:g} ms of CPU a tile at one vCPU "
                     "(scripts/bench.py cog) in each call's CPU; give it 1,024 MB (README)")
    if spot:
        notes.append(f"{ecs['spot']} % of the host hours on Spot at {prices.spot_source}: "
                     "an expectation (Spot prices move), and an interruption costs a host's "
                     "restart (the simulation's Spot worlds)")
    if scaling:
        notes.append(f"after the work the hosts wait ecs.idleMinutes ({ecs['idleMinutes']}), "
                     f"then the controller's next minute ends those without a task, down to "
                     f"{ecs['minInstances']}: ${idle.total:,.2f} more")
    else:
        notes.append("a fixed size bills its hosts until the stack is deleted; counted here "
                     "until the last tile only")
    notes.append(f"the stack's standing parts (NAT gateway, database, load balancer, secrets, "
                 f"the controller's metric reads) cost ${standing.total:,.2f} a day while it "
                 "exists, work or not")
    return Estimate(tiles, hosts, tasks, seconds, total, idle, standing.total, notes)

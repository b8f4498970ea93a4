"""``cnsq gpu-util``: GPU utilisation of every instance in the stack's ECS cluster.

Instances are found through ECS (container instances → EC2). ``nvidia-smi`` runs on each in
parallel through a runner passed in: SSH, or SSM Run Command (port 22 can stay closed). Tests pass
a runner that executes a fake nvidia-smi locally, so discovery and formatting run for real.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from cnsq.aws import Client, collect
from cnsq.errors import CnsqError

QUERY = ("nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total "
         "--format=csv,noheader,nounits")


class GpuError(CnsqError):
    """Reading an instance's GPUs failed (SSH, SSM, nvidia-smi), or the stack has no cluster."""


@dataclass(frozen=True)
class Instance:
    id: str
    ip: str
    instance_type: str


@dataclass
class Row:
    ip: str
    instance_type: str
    gpu: str = ""
    utilization: str = ""
    memory: str = ""
    error: str = ""


class Runner(Protocol):
    def run(self, instance: Instance, command: str) -> str: ...


class SshRunner:
    """Runs the command over ssh with a key; BatchMode so it never waits for a password."""

    def __init__(self, key: str, user: str = "ec2-user", timeout: float = 30.0):
        self.key, self.user, self.timeout = key, user, timeout

    def run(self, instance: Instance, command: str) -> str:
        done = subprocess.run(
            ["ssh", "-i", self.key, "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
             "-o", "StrictHostKeyChecking=accept-new", f"{self.user}@{instance.ip}", command],
            capture_output=True, text=True, timeout=self.timeout, check=False)
        if done.returncode != 0:
            raise GpuError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                               else f"ssh exited {done.returncode}")
        return done.stdout


class SsmRunner:
    """Runs the command through SSM Run Command (AWS-RunShellScript) and waits for its output."""

    def __init__(self, ssm: Client, timeout: float = 60.0, poll: float = 1.0):
        self.ssm, self.timeout, self.poll = ssm, timeout, poll

    def run(self, instance: Instance, command: str) -> str:
        sent = self.ssm.send_command(InstanceIds=[instance.id], DocumentName="AWS-RunShellScript",
                                     Parameters={"commands": [command]})
        command_id = sent["Command"]["CommandId"]
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            time.sleep(self.poll)
            try:
                result = self.ssm.get_command_invocation(CommandId=command_id,
                                                         InstanceId=instance.id)
            except self.ssm.exceptions.InvocationDoesNotExist:
                continue
            if result["Status"] == "Success":
                return result.get("StandardOutputContent", "")
            if result["Status"] in ("Failed", "Cancelled", "TimedOut"):
                raise GpuError(result.get("StandardErrorContent") or result["Status"])
        raise GpuError(f"SSM command did not finish within {self.timeout:.0f}s")


def discover(ecs: Client, ec2: Client, cluster: str) -> list[Instance]:
    """The EC2 instances registered in an ECS cluster."""
    arns: list[str] = []
    for page in ecs.get_paginator("list_container_instances").paginate(cluster=cluster):
        arns += page["containerInstanceArns"]
    if not arns:
        return []
    ids = []
    for start in range(0, len(arns), 100):
        described = ecs.describe_container_instances(cluster=cluster,
                                                     containerInstances=arns[start:start + 100])
        ids += [ci["ec2InstanceId"] for ci in described["containerInstances"]]
    instances = []
    for reservation in collect(ec2, "describe_instances", "Reservations", InstanceIds=ids):
        for item in reservation["Instances"]:
            ip = item.get("PublicIpAddress") or item.get("PrivateIpAddress", "")
            instances.append(Instance(item["InstanceId"], ip, item.get("InstanceType", "")))
    return sorted(instances, key=lambda i: i.ip)


def parse_nvidia_smi(text: str) -> list[tuple[str, str, str]]:
    """nvidia-smi's CSV → [(gpu index, utilisation %, 'used / total MiB')]."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            raise GpuError(f"unexpected nvidia-smi output: {line[:80]!r}")
        index, util, used, total = parts
        gpus.append((index, f"{util} %", f"{used} / {total} MiB"))
    if not gpus:
        raise GpuError("nvidia-smi listed no GPU")
    return gpus


def gpu_rows(instances: list[Instance], runner: Runner, workers: int = 16) -> list[Row]:
    """Run nvidia-smi on each instance in parallel; an unreachable one gets an error row."""

    def one(instance: Instance) -> list[Row]:
        try:
            gpus = parse_nvidia_smi(runner.run(instance, QUERY))
        except Exception as exc:  # noqa: BLE001 - shown in the instance's row
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return [Row(instance.ip, instance.instance_type, error=message)]
        return [Row(instance.ip, instance.instance_type, g, u, m) for g, u, m in gpus]

    if not instances:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(instances))) as pool:
        return [row for rows in pool.map(one, instances) for row in rows]

